"""tf.data preprocessors for the contrastive and LM tasks (seqio-style signatures).

Text side: E5 prefixes (``query: `` / ``passage: ``) and E5-mistral
instructions (``Instruct: {task}\\nQuery: {query}``, queries only).
Token side: truncation per side *before* the tokenizer's special tokens are
wrapped around (so ``[SEP]`` / EOS survive truncation, as in transformers),
chunking of long documents, and a token-length filter for long/short mixtures.
"""

from __future__ import annotations

import tensorflow as tf


def format_contrastive(ds: tf.data.Dataset, *, query_prefix: str = "", passage_prefix: str = "",
                       instruction: str | None = None) -> tf.data.Dataset:
    """Prefixes queries and passages, or wraps queries in an instruction.

    An example's own non-empty ``instruction`` wins over the task's ``instruction``.
    """

    def fn(ex):
        ex = dict(ex)
        query = ex["query"]
        own = ex.get("instruction", tf.constant(""))
        if instruction is not None or "instruction" in ex:
            task = tf.constant(instruction or "")
            chosen = tf.where(tf.strings.length(own) > 0, own, task)
            wrapped = tf.strings.join(["Instruct: ", chosen, "\nQuery: ", query])
            query = tf.where(tf.strings.length(chosen) > 0, wrapped, query_prefix + query)
        else:
            query = query_prefix + query
        ex["query"] = query
        ex["passages"] = passage_prefix + ex["passages"]
        ex.pop("instruction", None)
        return ex

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def tokenize(ds: tf.data.Dataset, vocabularies: dict) -> tf.data.Dataset:
    """Replaces the string features named in ``vocabularies`` by int32 ids (ragged for rank > 0)."""

    def fn(ex):
        ex = dict(ex)
        for key, vocab in vocabularies.items():
            ex[key] = tf.cast(vocab.encode_tf(ex[key]), tf.int32)
        return ex

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def truncate_and_wrap(ds: tf.data.Dataset, lengths: dict[str, int],
                      special: dict[str, tuple[list[int], list[int]]]) -> tf.data.Dataset:
    """Cuts each feature's text ids so that ``prefix + ids + suffix`` fits ``lengths[key]``.

    Works on rank-1 ids and on ragged ``[n, None]`` ids (passages).
    """
    for key, length in lengths.items():
        prefix, suffix = special.get(key, ([], []))
        if length <= len(prefix) + len(suffix):
            raise ValueError(f"sequence length {length} for {key!r} leaves no room for text "
                             f"between {len(prefix)} + {len(suffix)} special tokens")

    def fn(ex):
        ex = dict(ex)
        for key, length in lengths.items():
            prefix, suffix = special.get(key, ([], []))
            ids = ex[key]
            room = length - len(prefix) - len(suffix)
            if isinstance(ids, tf.RaggedTensor):
                ids = ids[:, :room]
                def repeat(tokens):  # the same special ids on every passage
                    row = tf.constant([tokens], tf.int32, shape=[1, len(tokens)])
                    return tf.RaggedTensor.from_tensor(tf.tile(row, [ids.nrows(), 1]))

                ex[key] = tf.concat([repeat(prefix), ids, repeat(suffix)], axis=1)
            else:
                ex[key] = tf.concat([tf.constant(prefix, tf.int32), ids[:room],
                                     tf.constant(suffix, tf.int32)], axis=0)
        return ex

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def append_eos(ds: tf.data.Dataset, key: str, eos_id: int) -> tf.data.Dataset:
    return ds.map(lambda ex: {**ex, key: tf.concat([ex[key], [eos_id]], axis=0)},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def chunk(ds: tf.data.Dataset, key: str, length: int) -> tf.data.Dataset:
    """Splits each example's ``key`` ids into consecutive pieces of at most ``length``."""

    def pieces(ex):
        ids = ex[key]
        n = tf.size(ids, out_type=tf.int64)
        starts = tf.range(0, n, length, dtype=tf.int64)
        rows = tf.RaggedTensor.from_row_lengths(ids, tf.minimum(tf.cast(length, tf.int64), n - starts))
        # Every piece remembers its document's length (long / short mixtures are by document).
        doc_tokens = tf.fill([tf.size(starts)], tf.cast(n, tf.int32))
        return tf.data.Dataset.from_tensor_slices({key: rows, "document_tokens": doc_tokens})

    return ds.flat_map(pieces)


def filter_by_length(ds: tf.data.Dataset, key: str, min_tokens: int = 0,
                     max_tokens: int | None = None) -> tf.data.Dataset:
    """Keeps examples with ``min_tokens <= len(key) < max_tokens``."""

    def keep(ex):
        n = tf.size(ex[key])
        ok = n >= min_tokens
        if max_tokens is not None:
            ok = tf.logical_and(ok, n < max_tokens)
        return ok

    return ds.filter(keep)
