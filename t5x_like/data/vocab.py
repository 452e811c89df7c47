"""seqio vocabularies for both model families.

* ``sentencepiece_vocabulary(path)``: seqio's own SentencePieceVocabulary
  (Llama-2's ``tokenizer.model``).
* ``HFTokenizerVocabulary(path)``: a seqio ``Vocabulary`` over a Hugging Face
  ``tokenizer.json`` (BERT WordPiece as all-MiniLM and E5 v2 use, XLM-R's
  Unigram). Like every seqio vocabulary it encodes text *without* special
  tokens; ``special_tokens()`` gives the ``[CLS] ... [SEP]`` / ``<s> ... </s>``
  the model's tokenizer wraps a text in, so preprocessors truncate the text
  first and wrap it afterwards (as transformers' truncation does).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from t5x_like.convert.tokenizer import special_token, special_token_settings


def sentencepiece_vocabulary(path: str | Path) -> seqio.SentencePieceVocabulary:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SentencePiece model {path} does not exist")
    return seqio.SentencePieceVocabulary(str(path))


class HFTokenizerVocabulary(seqio.Vocabulary):
    """A seqio vocabulary backed by the ``tokenizers`` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no tokenizer.json")
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.no_truncation()
        self._tok.no_padding()
        settings = special_token_settings(self.path.parent)
        self._pad = self._special_id(settings, "pad_token", 0)
        self._eos = self._special_id(settings, "eos_token", None)
        self._unk = self._special_id(settings, "unk_token", None)
        self._prefix, self._suffix = self._wrapping()
        super().__init__(extra_ids=0)

    def _special_id(self, settings: dict, key: str, default):
        token = special_token(settings, key)
        found = self._tok.token_to_id(token) if token else None
        return default if found is None else found

    def _wrapping(self) -> tuple[list[int], list[int]]:
        """The special ids the post-processor puts before and after a single text."""
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return full[:start], full[start + len(bare):]
        return [], []

    def special_tokens(self) -> tuple[list[int], list[int]]:
        """``(prefix_ids, suffix_ids)``, e.g. ``([101], [102])`` for BERT."""
        return list(self._prefix), list(self._suffix)

    # seqio.Vocabulary interface -------------------------------------------------

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def unk_id(self) -> int | None:
        return self._unk

    @property
    def _base_vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, s: str) -> list[int]:
        return self._tok.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(batch):
            texts = [x.decode("utf-8") for x in batch]
            ids = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
            flat = np.fromiter((i for row in ids for i in row), np.int32,
                               count=sum(len(row) for row in ids))
            return flat, np.array([len(row) for row in ids], np.int64)

        flat_texts = tf.reshape(s, [-1])
        # numpy_function (not py_function + tf.ragged.constant): ~30x less overhead per call.
        values, lengths = tf.numpy_function(encode, [flat_texts], [tf.int32, tf.int64],
                                            stateful=False)
        values.set_shape([None])
        lengths.set_shape([flat_texts.shape[0]])  # keeps the static text count (passages)
        ragged = tf.RaggedTensor.from_row_lengths(values, lengths)
        return ragged[0] if s.shape.rank == 0 else ragged

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(x):
            return tf.constant(self._decode(x.numpy().tolist()))

        return tf.py_function(decode, [ids], tf.string)

    def __eq__(self, other) -> bool:
        return isinstance(other, HFTokenizerVocabulary) and other.path == self.path

    def __hash__(self) -> int:
        return hash(str(self.path))
