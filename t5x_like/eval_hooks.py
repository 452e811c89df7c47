"""Evaluations a training run makes between steps, each an ``EvalHook`` of the trainer.

- ``beir_hook``: nDCG@10 / recall@100 of the current parameters on a BEIR split
  (and BM25 once, as the baseline row);
- ``perplexity_hook``: cross-entropy and perplexity on fixed held-out LM batches.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax

from t5x_like.callbacks import EvalHook
from t5x_like.export import to_host
from t5x_like.model_sources import resolve_path
from t5x_like.partitioning import Partitioner


def beir_hook(cfg, task, model_config, tok_dir, workdir, trainer) -> tuple[EvalHook, dict]:
    """nDCG@10 / recall@100 of the current parameters on a BEIR split (+ BM25 once).

    The embedder runs on the trainer's partitioner (parameters where training keeps
    them), in the run's compute dtype and attention backend; ``eval.dtype`` overrides
    the dtype (``float32`` for the most exact figures where the backend allows it).
    """
    from t5x_like.convert.hf_config import read_hf_config
    from t5x_like.convert.tokenizer import load_tokenizer
    from t5x_like.data.sources import read_beir
    from t5x_like.embedder import Embedder, default_max_length
    from t5x_like.evaluation import beir, retrieval

    e = cfg.eval
    data = read_beir(resolve_path(e.beir_path, "eval.beir_path"), e.split)
    if e.max_queries:
        data = data.subset(e.max_queries, e.extra_documents or None)
    query_ids = sorted(data.qrels)
    hf_config = read_hf_config(tok_dir) if (tok_dir / "config.json").exists() else None
    # Several processes: each evaluates alone on its first local device (no collectives to
    # hang on); only process 0 writes the embedding cache.
    alone = jax.process_count() > 1
    partitioner = Partitioner.local() if alone else trainer.partitioner
    embed_config = dataclasses.replace(model_config, dtype=e.dtype) if e.dtype else model_config
    embedder = Embedder(embed_config, params=None, tokenizer=load_tokenizer(tok_dir, hf_config),
                        pooling=task.pooling, append_eos=cfg.data.append_eos,
                        max_length=e.max_length or default_max_length(model_config),
                        mesh=partitioner)
    export = jax.jit(task.export_params)
    cache = Path(e.cache_dir) if e.cache_dir else Path(workdir) / "embeddings"
    qrels = {q: data.qrels[q] for q in query_ids}
    baseline = {}
    if e.bm25:
        baseline = retrieval.evaluate(qrels, beir.bm25_run(data, query_ids, k=e.k), k_values=(10, 100))

    if alone:
        sharded_export = export

        def export(params):
            return to_host(sharded_export(params))

        cache = cache if jax.process_index() == 0 else None

    def evaluate(state):
        embedder.params = export(state.params)
        run = beir.dense_run(embedder, data, query_ids, k=e.k, batch_size=e.batch_size,
                             query_prefix=e.query_prefix or None,
                             passage_prefix=e.passage_prefix or None,
                             instruction=e.instruction or None, cache_dir=cache,
                             mesh=None if alone else partitioner.mesh)
        metrics = retrieval.evaluate(qrels, run, k_values=(10, 100))
        return {"ndcg@10": metrics["ndcg@10"], "recall@100": metrics["recall@100"]}

    return EvalHook("beir", e.every or 10 ** 9, evaluate), baseline


def perplexity_hook(cfg, task, trainer, vocab) -> EvalHook:
    from t5x_like.data import builders

    e = cfg.eval
    section = cfg.data.copy_and_resolve_references()
    section.path = str(resolve_path(e.lm_path, "eval.lm_path"))
    # eval.lm_path is plain text, whatever the training mix (instructions, long / short)
    section.update(format="text", instructions_path="", long_fraction=0.0)
    batches = builders.lm_batches(section, vocab, cfg.train.batch_size, trainer.mesh,
                                  seed=cfg.seed, name="eval_lm")
    fixed = [next(batches) for _ in range(e.lm_batches)]
    eval_sums = jax.jit(task.eval_sums)

    def evaluate(state):
        with trainer.partitioner.scope():  # per-device kernels (Pallas) shard over its mesh
            totals = [jax.device_get(eval_sums(state.params, b)) for b in fixed]
        loss = sum(t["cross_entropy"] for t in totals) / sum(t["weight"] for t in totals)
        return {"cross_entropy": loss, "perplexity": math.exp(loss)}

    return EvalHook("eval", e.every or 10 ** 9, evaluate)


