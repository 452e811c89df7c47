"""``python -m t5x_like.synthesis --config=configs/synthesis.py[:ARG] --config.output=FILE``.

Every field of the config can be overridden with ``--config.SECTION.FIELD=VALUE``;
a misspelt field is an error listing the valid ones (``config_cli``). Paths
(data, models, tokenizer, output) and settings are checked before any model
loads. Re-running the same command resumes the output file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags

from t5x_like import cli, config_cli
from t5x_like.model_sources import resolve_model_dir, resolve_path
from t5x_like.run_config import from_section
from t5x_like.synthesis.lm import HTTPLM, LocalLM, tokenizer_counter
from t5x_like.synthesis.retrieval import BM25Retriever, DenseRetriever, load_documents
from t5x_like.synthesis.workflow import Settings, Workflow

log = logging.getLogger(__name__)


def define_flags() -> None:
    """Defined only when run as a program, so importing this module defines no flags."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "ml-collections config file[:arg].")


def check_config(cfg) -> dict:
    """Every path and setting, before a model is loaded: ``{field: resolved path}``."""
    if not cfg.output:
        raise ValueError("config.output is empty: give the JSONL file to write (or resume)")
    output = Path(cfg.output).expanduser()
    if output.is_dir():
        raise IsADirectoryError(f"config.output={cfg.output!r} is a directory, not a file")
    parent = next((p for p in output.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise NotADirectoryError(f"config.output={cfg.output!r}: {parent} is not a directory")
    from_section(Settings, cfg.synthesis, "synthesis")  # settings first: nothing to load
    found = {"output": output, "data.path": resolve_path(cfg.data.path, "data.path")}
    if cfg.lm.kind == "local":
        found["lm.model"] = resolve_model_dir(cfg.lm.model, "lm.model")
    elif cfg.lm.kind == "http":
        if not cfg.lm.url or not cfg.lm.name:
            raise ValueError("config.lm.kind='http' needs config.lm.url and config.lm.name")
        if cfg.lm.window < 1:
            raise ValueError("config.lm.kind='http' needs config.lm.window (the served context)")
        if cfg.lm.tokenizer:
            found["lm.tokenizer"] = resolve_path(cfg.lm.tokenizer, "lm.tokenizer")
    else:
        raise ValueError(f"config.lm.kind={cfg.lm.kind!r} is not one of ('local', 'http')")
    if cfg.retriever.kind == "dense":
        found["retriever.model"] = resolve_model_dir(cfg.retriever.model, "retriever.model")
    elif cfg.retriever.kind != "bm25":
        raise ValueError(f"config.retriever.kind={cfg.retriever.kind!r} is not one of ('bm25', 'dense')")
    return found


def build_lm(cfg, found: dict):
    c = cfg.lm
    if c.kind == "http":
        counter = tokenizer_counter(found["lm.tokenizer"]) if "lm.tokenizer" in found else None
        if counter is None:
            log.warning("config.lm.tokenizer is empty: token counts are estimated (4 characters "
                        "a token); leave headroom in config.lm.window")
        return HTTPLM(c.url, c.name, window=c.window, api=c.api, count_tokens=counter,
                      temperature=c.temperature, api_key_env=c.api_key_env, timeout=c.timeout,
                      concurrency=c.concurrency)
    return LocalLM.from_directory(found["lm.model"], window=c.window or None, batch_size=c.batch_size,
                                  bucket=c.bucket, temperature=c.temperature, top_p=c.top_p,
                                  seed=c.seed)


def build_retriever(cfg, found: dict, documents: dict[str, str]):
    c = cfg.retriever
    if c.kind == "bm25":
        return BM25Retriever(documents)
    from t5x_like.embedder import Embedder

    embedder = Embedder.from_pretrained(found["retriever.model"])
    return DenseRetriever(embedder, documents, query_prefix=c.query_prefix or None,
                          passage_prefix=c.passage_prefix or None,
                          instruction=c.instruction or None, batch_size=c.batch_size)


def run(cfg, found: dict | None = None):
    """The whole command on a config (``found``: its ``check_config`` paths, when already
    checked); returns the run's counters."""
    found = found or check_config(cfg)
    settings = from_section(Settings, cfg.synthesis, "synthesis")
    documents = load_documents(found["data.path"], max_documents=cfg.data.max_documents,
                               on_bad_record=cfg.data.on_bad_record)
    workflow = Workflow(build_lm(cfg, found), None, documents, settings)
    workflow.retriever = build_retriever(cfg, found, documents)
    stats = workflow.run(found["output"], progress=cfg.progress)
    print(f"{found['output']}: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return stats


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.FIELD=VALUE")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config=FILE[:ARG] is required (e.g. configs/synthesis.py)")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("t5x_like").setLevel(logging.INFO)
    try:  # configuration mistakes read as usage errors; failures later keep their traceback
        found = check_config(flags.FLAGS.config)
    except (ValueError, OSError) as e:
        raise app.UsageError(str(e)) from None
    run(flags.FLAGS.config, found)


if __name__ == "__main__":
    define_flags()
    cli.run_absl(main, config_cli.parse_flags)
