"""Long-context data synthesis (t5x_like.synthesis). Arg: local (default) | http | tiny.

    python -m t5x_like.synthesis --config=configs/synthesis.py --config.output=synth.jsonl \
        --config.lm.model=/models/Llama-2-7b-chat-hf --config.data.path=beir/scifact

    python -m t5x_like.synthesis --config=configs/synthesis.py:http --config.output=synth.jsonl \
        --config.lm.url=http://localhost:8000 --config.lm.name=meta-llama/Llama-3-8B-Instruct \
        --config.lm.tokenizer=/models/llama3/tokenizer.json

Re-running the same command resumes: ids already in the output are skipped.
Paths that are not absolute and do not exist here are looked up under the
shared data directory ($T5X_LIKE_SHARED_DATA or ../shared/data).
"""

import dataclasses

import ml_collections

from t5x_like.synthesis.workflow import Settings


def get_config(variant: str = "local"):
    if variant not in ("local", "http", "tiny"):
        raise ValueError(f"configs/synthesis.py: unknown variant {variant!r} (local | http | tiny)")
    c = ml_collections.ConfigDict()
    c.output = ""  # the JSONL file (appended to; resumable)
    c.progress = True
    c.data = ml_collections.ConfigDict(dict(
        path="beir/scifact",  # a BEIR directory, a corpus-style .jsonl, or .txt file(s)
        max_documents=0,  # keep the first N documents (0: all)
        on_bad_record="error",  # error | skip
    ))
    c.lm = ml_collections.ConfigDict(dict(
        kind="http" if variant == "http" else "local",  # local | http
        model="",  # local: a Hugging Face decoder directory (weights + tokenizer)
        window=0,  # prompt + generation tokens; 0: local max_position_embeddings (http: required)
        batch_size=8,  # local: prompts per compiled generate call
        bucket=64,  # local: prompt widths rounded up to a multiple of this
        temperature=0.7,
        top_p=0.95,
        seed=0,
        url="",  # http: the server, e.g. http://localhost:8000
        name="",  # http: the served model name
        api="chat",  # http: chat (/v1/chat/completions) | completions (/v1/completions)
        tokenizer="",  # http: tokenizer for token counts (else ~4 characters a token)
        api_key_env="OPENAI_API_KEY",  # http: the environment variable holding the key
        timeout=120.0,
        concurrency=8,  # http: requests in flight at once
    ))
    if variant == "http":
        c.lm.window = 8192
    c.retriever = ml_collections.ConfigDict(dict(
        kind="bm25",  # bm25 | dense
        model="",  # dense: an embedder directory (Embedder.from_pretrained)
        query_prefix="",  # dense: E5 "query: "
        passage_prefix="",  # dense: E5 "passage: "
        instruction="",  # dense: E5-mistral task instruction for queries
        batch_size=32,
    ))
    c.synthesis = ml_collections.ConfigDict(dataclasses.asdict(Settings()))
    if variant == "tiny":  # a smoke run: a handful of short examples from a small corpus
        c.data.path = "beir/scifact"
        c.data.max_documents = 200
        c.lm.window = 512
        c.lm.temperature = 0.0
        c.synthesis.update(dict(
            num_multi_doc=4, num_long_output=2, docs_per_example=3, max_docs_per_example=6,
            min_input_tokens=64, max_input_tokens=4096, max_summary_tokens=24,
            max_instruction_tokens=24, max_answer_tokens=32, seed_passage_tokens=64,
            long_output_min_tokens=200, long_output_max_tokens=600, batch_size=4))
    return c
