"""Training data from a config section: seqio tasks registered and batched in one call.

``contrastive_batches(cfg, vocab, ...)`` reads a BEIR directory or a JSONL
file of pairs, mines hard negatives (BM25 or a run file), registers the task
and returns resumable ``GlobalBatches``; ``lm_batches`` does the same for text
documents packed into rows. The trainer only sees the batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

from t5x_like.data import converters, mining, pipeline, sources, tasks
from t5x_like.data.vocab import HFTokenizerVocabulary, sentencepiece_vocabulary

log = logging.getLogger(__name__)
NEGATIVES = ("bm25", "random", "run_file", "given")


def vocabulary(path: str | Path):
    """A tokenizer.json (or a directory holding one) or a SentencePiece ``.model``."""
    path = Path(path)
    if path.suffix == ".model":
        return sentencepiece_vocabulary(path)
    return HFTokenizerVocabulary(path)


def contrastive_examples(cfg) -> list[dict]:
    """Examples from ``cfg.format`` = ``beir`` (``path``, ``split``) or ``pairs`` (JSONL)."""
    if cfg.negatives not in NEGATIVES:
        raise ValueError(f"data.negatives={cfg.negatives!r} is not one of {NEGATIVES}")
    if cfg.format == "pairs":
        return tasks.pair_examples(sources.read_pairs(cfg.path, on_bad_record=cfg.on_bad_record),
                                   cfg.num_negatives, seed=cfg.seed, source=str(cfg.path))
    if cfg.format != "beir":
        raise ValueError(f"data.format={cfg.format!r} is not one of ('beir', 'pairs')")
    data = sources.read_beir(cfg.path, cfg.split, on_bad_record=cfg.on_bad_record)
    negatives = None
    if cfg.num_negatives and cfg.negatives == "bm25":
        log.info("mining BM25 negatives for %d queries", len(data.qrels))
        negatives = mining.bm25_negatives(data, sorted(data.qrels), depth=cfg.mining_depth)
    elif cfg.num_negatives and cfg.negatives == "run_file":
        negatives = mining.run_file_negatives(cfg.run_file, data.qrels, depth=cfg.mining_depth)
    return tasks.beir_examples(data, negatives, num_negatives=cfg.num_negatives, seed=cfg.seed)


def contrastive_batches(cfg, vocab, global_batch_size: int, mesh=None, *, seed: int = 0,
                        name: str = "train_contrastive") -> pipeline.GlobalBatches:
    examples = contrastive_examples(cfg)
    spec = tasks.ContrastiveSpec(
        query_length=cfg.query_length, passage_length=cfg.passage_length,
        query_prefix=cfg.query_prefix, passage_prefix=cfg.passage_prefix,
        instruction=cfg.instruction or None, append_eos=cfg.append_eos)
    tasks.add_contrastive_task(name, examples, vocab, spec)
    log.info("%s: %d examples, %d passages each", name, len(examples), len(examples[0]["passages"]))
    batches = pipeline.global_batches(
        name, converters.ContrastiveConverter(pad_id=vocab.pad_id),
        {"query": cfg.query_length, "passages": cfg.passage_length}, global_batch_size, mesh,
        seed=seed, process_sharding=process_sharding(cfg, default="batch"))
    batches.num_examples = len(examples)  # for epoch-based step counts
    return batches


def lm_batches(cfg, vocab, global_batch_size: int, mesh=None, *, seed: int = 0,
               name: str = "train_lm") -> pipeline.GlobalBatches:
    """Text files (``cfg.path``: a file or a directory of .txt) packed into ``cfg.length`` rows.

    ``cfg.format == "instructions"``: ``cfg.path`` is a JSONL of ``{"input", "target"}``
    examples (``t5x_like.synthesis`` output) packed the same way, loss on targets only.
    The long-context mix: ``cfg.long_fraction > 0`` draws documents of at least
    ``cfg.long_threshold`` tokens (default: a row) at that rate, shorter ones at the rest;
    ``cfg.instructions_path`` adds such a JSONL at ``cfg.instructions_rate``. Text trains
    on every token, instructions on their targets only (weights per token, one mean).
    """
    if cfg.get("format") == "instructions":
        mixture = [(_instruction_task(f"{name}_instructions", cfg.path, cfg, vocab), 1.0)]
    else:
        mixture = [(_text_task(f"{name}_text", cfg, vocab), 1.0)]
        if cfg.get("instructions_path"):
            rate = cfg.instructions_rate
            if not 0 < rate < 1:
                raise ValueError(f"data.instructions_rate={rate} must be in (0, 1) with "
                                 "data.instructions_path")
            mixture = [(mixture[0][0], 1 - rate),
                       (_instruction_task(f"{name}_instructions", cfg.instructions_path, cfg,
                                          vocab), rate)]
    source = mixture[0][0] if len(mixture) == 1 else tasks.add_mixture(name, mixture).name
    return pipeline.global_batches(source, converters.LMConverter(pad_id=vocab.pad_id),
                                   {"targets": cfg.length}, global_batch_size, mesh, seed=seed,
                                   process_sharding=process_sharding(cfg, default="source"))


def process_sharding(cfg, *, default: str) -> str:
    """``data.process_sharding``, with "auto" meaning ``default``: "batch" for in-memory
    contrastive sets (tokenized once, then cached), "source" for LM text."""
    mode = cfg.get("process_sharding", "auto")
    if mode == "auto":
        return default
    if mode not in pipeline.PROCESS_SHARDING:
        raise ValueError(f"config.data.process_sharding={mode!r} is not one of "
                         f"{('auto',) + pipeline.PROCESS_SHARDING}")
    return mode


def _text_task(name: str, cfg, vocab) -> str:
    documents = [text for _, text in sources.read_text_documents(cfg.path)]
    if cfg.split_paragraphs:
        documents = [p for d in documents for p in d.split("\n\n") if p.strip()]
    long_fraction = cfg.get("long_fraction", 0.0)
    if long_fraction:
        tasks.add_length_mixture(name, documents, vocab, chunk_length=cfg.length,
                                 threshold=cfg.long_threshold or cfg.length, long_rate=long_fraction)
    else:
        tasks.add_lm_task(name, documents, vocab, chunk_length=cfg.length)
    return name


def _instruction_task(name: str, path, cfg, vocab) -> str:
    examples = sources.read_instruction_examples(path, on_bad_record=cfg.on_bad_record)
    tasks.add_instruction_task(name, examples, vocab, length=cfg.length)
    log.info("%s: %d instruction examples (longer than %d tokens are dropped)", name,
             len(examples), cfg.length)
    return name
