"""The long-context recipe end to end on a CPU: pre-train at 512 tokens, extend to 2048, probe.

    python bench/long_context_demo.py --workdir runs/long_context_demo [--record]

1. Splits the shared Gutenberg books: Frankenstein is held out, the other nine train.
2. Trains a 4K-piece SentencePiece BPE vocabulary on the nine (``WORKDIR/tokenizer``).
3. Pre-trains ``configs/long_context_demo.py:pretrain`` (512-token rows, RoPE base 10K).
4. Extends it with ``configs/long_context_demo.py:extend``: two stages, 1024 then 2048
   tokens a row, RoPE base 40K then 160K (``t5x_like.stages``).
5. Probes the pre-trained model ("before") and the extended one ("after") at 512, 1024 and
   2048 tokens (1x, 2x, 4x the pre-training context): sliding-window perplexity on the
   held-out book and passkey retrieval (``t5x_like.evaluation.long_context``).
6. Prints the before / after table, writes ``WORKDIR/summary.json`` and
   ``WORKDIR/perplexity_before_after.png``; ``--record`` appends the table to
   bench/RESULTS.md.

Every step is resumable: a finished step is skipped when the command runs again. Extra
``--config.FIELD=VALUE`` style overrides are not taken here; edit the config file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t5x_like import config_cli, paths  # noqa: E402

LENGTHS = (512, 1024, 2048)
HELD_OUT = "frankenstein_pg84.txt"
RESULTS = ROOT / "bench" / "RESULTS.md"


def split_books(workdir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``(directory of training books (links), held-out book)``."""
    books = paths.shared_data("text/gutenberg")
    train_dir = workdir / "books_train"
    train_dir.mkdir(parents=True, exist_ok=True)
    for book in sorted(books.glob("*.txt")):
        link = train_dir / book.name
        if book.name != HELD_OUT and not link.exists():
            link.symlink_to(book.resolve())
    return train_dir, books / HELD_OUT


def train_tokenizer(train_dir: pathlib.Path, out: pathlib.Path, vocab_size: int = 4096) -> pathlib.Path:
    """A SentencePiece BPE model with Llama's special ids (unk 0, <s> 1, </s> 2, byte fallback)."""
    model = out / "tokenizer.model"
    if model.exists():
        return model
    import sentencepiece as spm

    from t5x_like.data.sources import read_text_documents

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    with open(corpus, "w") as f:
        for _, text in read_text_documents(train_dir):
            for paragraph in text.split("\n\n"):
                line = " ".join(paragraph.split())
                if line:
                    f.write(line + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, input_sentence_size=400_000, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2)
    corpus.unlink()
    return model


def train_step(spec: str, workdir: pathlib.Path, **overrides) -> pathlib.Path:
    """Runs (or resumes, or skips when finished) one config; returns its final export."""
    from t5x_like import train
    from t5x_like.stages import finished, stage_configs

    cfg = config_cli.load_config_file(spec)
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        cfg[section][field] = value
    if cfg.stages.num == 0 and finished(workdir):
        return workdir / "export"
    results = train.train(cfg, workdir)
    runs = list(results["stages"].values()) if "stages" in results else [results]
    if len(runs) < cfg.stages.num or not all(r["completed"] for r in runs):
        sys.exit(f"{workdir} stopped before the end; run the same command again to resume")
    if "stages" in results:
        return stage_configs(cfg, workdir)[-1][0] / "export"
    return workdir / "export"


def probe(model: pathlib.Path, tokenizer: pathlib.Path, book: pathlib.Path,
          out: pathlib.Path) -> dict:
    """Perplexity versus length on the held-out book and passkey accuracy, at LENGTHS."""
    from t5x_like.evaluation import long_context

    lengths = ",".join(map(str, LENGTHS))
    common = ["--model", str(model), "--tokenizer", str(tokenizer), "--lengths", lengths,
              "--attention", "chunked", "--batch-size", "4", "--no-progress"]
    results = {}
    for command, extra in (("perplexity", ["--books", str(book), "--max-tokens", "16384"]),
                           ("passkey", ["--depths", "0,0.5,1", "--trials", "4"])):
        saved = out / f"{command}.json"
        if not saved.exists():
            long_context.main([command, *common, *extra, "--output", str(out)])
        results[command] = json.loads(saved.read_text())
    return results


def summarise(before: dict, after: dict) -> dict:
    def row(report):
        perplexity = {p["length"]: p["perplexity"] for p in report["perplexity"]["points"]}
        passkey = report["passkey"]
        accuracy = {L: sum(col) / len(col) for L, col in
                    zip(passkey["lengths"], zip(*passkey["exact_match"]))}
        loglik = {L: sum(col) / len(col) for L, col in
                  zip(passkey["lengths"], zip(*passkey["answer_loglik"]))}
        return {"perplexity": perplexity, "passkey": accuracy, "passkey_loglik": loglik}

    return {"lengths": list(LENGTHS), "before": row(before), "after": row(after)}


def table(summary: dict) -> str:
    lengths = summary["lengths"]
    head = "| model | " + " | ".join(
        [f"ppl @ {L} ({L // lengths[0]}x)" for L in lengths]
        + [f"passkey @ {L}" for L in lengths]) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(lengths))]
    for name in ("before", "after"):
        r = summary[name]
        cells = [f"{r['perplexity'][L]:.2f}" for L in lengths]
        cells += [f"{r['passkey'][L]:.2f} ({r['passkey_loglik'][L]:.2f})" for L in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
    from t5x_like.evaluation.long_context import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("before", "pre-trained at 512 (RoPE base 10K)"),
                        ("after", "extended to 2048 (base 160K)")):
        ppl = summary[name]["perplexity"]
        ax.plot(summary["lengths"], [ppl[L] for L in summary["lengths"]], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["lengths"], [str(L) for L in summary["lengths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity on the held-out book")
    ax.set_title("Context extension 512 -> 2048: perplexity vs length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/long_context_demo")
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir).resolve()
    start = time.time()
    train_dir, held_out = split_books(workdir)
    tokenizer = train_tokenizer(train_dir, workdir / "tokenizer")
    data = {"data.path": str(train_dir), "model.tokenizer": str(tokenizer),
            "eval.lm_path": str(held_out)}
    pretrained = train_step(f"{ROOT}/configs/long_context_demo.py:pretrain", workdir / "pretrain", **data)
    extended = train_step(f"{ROOT}/configs/long_context_demo.py:extend", workdir / "extend",
                          **data, **{"model.pretrained": str(pretrained)})
    before = probe(pretrained, tokenizer, held_out, workdir / "probes_before")
    after = probe(extended, tokenizer, held_out, workdir / "probes_after")
    summary = summarise(before, after)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(summary, workdir / "perplexity_before_after.png")
    text = table(summary)
    minutes = (time.time() - start) / 60
    print("\n" + text + f"\n\n(passkey: exact match (mean answer log-likelihood)); {minutes:.1f} min; "
          f"plots in {workdir}")
    if args.record:
        import jax

        with open(RESULTS, "a") as f:
            f.write(f"\n## Long-context extension demo (512 -> 2048)\n\nCommand: `python "
                    f"bench/long_context_demo.py --record` ({platform.processor() or 'cpu'}, "
                    f"jax {jax.__version__}, {datetime.date.today()}; this call {minutes:.0f} min, "
                    f"finished steps skipped)\n\n{text}\n")


if __name__ == "__main__":
    main()
