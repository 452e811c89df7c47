"""Feature converters: tokenized task examples -> fixed-shape model features.

They follow seqio's ``converter(ds, task_feature_lengths)`` call, but are not
``seqio.FeatureConverter`` subclasses: seqio's validation accepts rank-1
features only, and contrastive passages are ``[1 + negatives, length]``.

* ``ContrastiveConverter``: ``query_tokens`` / ``query_mask`` ``[q_len]``,
  ``passage_tokens`` / ``passage_mask`` ``[1 + n_neg, p_len]`` (positive first),
  ``teacher_scores`` ``[1 + n_neg]`` when the task has them.
* ``LMConverter``: documents packed into rows of ``length`` with
  ``segment_ids`` (1, 2, ... per document, 0 for padding), ``positions``
  restarting at 0 at every document, and ``loss_weights`` (1 on every real token;
  for instruction tasks, whose examples carry a per-token ``loss_mask``, 1 only
  on the answer tokens).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from t5x_like.data import packing


@dataclasses.dataclass(frozen=True)
class ContrastiveConverter:
    pad_id: int = 0

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: dict[str, int]) -> tf.data.Dataset:
        q_len = task_feature_lengths["query"]
        p_len = task_feature_lengths["passages"]
        num_passages = ds.element_spec["passages"].shape[0]
        if num_passages is None:
            raise ValueError("ContrastiveConverter: the task's passage count must be static")

        def fn(ex):
            query = ex["query"][:q_len]
            q_pad = q_len - tf.size(query)
            passages = ex["passages"]
            if isinstance(passages, tf.RaggedTensor):
                p_mask = tf.ones_like(passages).to_tensor(0, shape=[num_passages, p_len])
                passages = passages.to_tensor(self.pad_id, shape=[num_passages, p_len])
            else:
                passages = passages[:, :p_len]
                p_mask = tf.ones_like(passages)
                pad = [[0, 0], [0, p_len - tf.shape(passages)[1]]]
                passages = tf.pad(passages, pad, constant_values=self.pad_id)
                p_mask = tf.pad(p_mask, pad)
            out = {
                "query_tokens": tf.pad(query, [[0, q_pad]], constant_values=self.pad_id),
                "query_mask": tf.pad(tf.ones_like(query), [[0, q_pad]]),
                "passage_tokens": passages,
                "passage_mask": p_mask,
            }
            for key in out:
                out[key] = tf.ensure_shape(tf.cast(out[key], tf.int32),
                                           [q_len] if key.startswith("query") else [num_passages, p_len])
            if "scores" in ex:
                out["teacher_scores"] = tf.ensure_shape(ex["scores"], [num_passages])
            return out

        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class LMConverter:
    """Packs ``targets`` documents (already chunked to <= length) into rows.

    Packing is next-fit over windows of ``window`` documents (``packing.pack``
    through ``tf.numpy_function``): seqio's own packer batches ``length``
    documents per window, which at 8K-token rows means tokenizing 67M tokens
    before the first row.
    """

    pack: bool = True
    window: int = 128
    pad_id: int = 0

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: dict[str, int]) -> tf.data.Dataset:
        length = task_feature_lengths["targets"]
        # Instruction tasks: a 0/1 mask per target token; plain documents train on every token.
        masked = "loss_mask" in ds.element_spec

        def cut(ex):
            targets = tf.cast(ex["targets"][:length], tf.int32)
            mask = ex["loss_mask"][:length] if masked else tf.ones_like(targets)
            return {"targets": targets, "loss_mask": tf.cast(mask, tf.float32)}

        ds = ds.map(cut)
        if self.pack:
            ds = _pack(ds, length, self.window, self.pad_id)
        else:
            ds = ds.map(lambda ex: {
                "tokens": ex["targets"],
                "segment_ids": tf.ones_like(ex["targets"]),
                "positions": tf.range(tf.size(ex["targets"]), dtype=tf.int32),
                "loss_mask": ex["loss_mask"],
            })

        def fn(ex):
            def fixed(x, pad=0):
                return tf.ensure_shape(tf.pad(x, [[0, length - tf.size(x)]], constant_values=pad),
                                       [length])

            segments = fixed(ex["segment_ids"])
            return {
                "tokens": fixed(ex["tokens"], self.pad_id),
                "segment_ids": segments,
                "positions": fixed(ex["positions"]),
                "loss_weights": tf.cast(segments > 0, tf.float32) * fixed(ex["loss_mask"]),
            }

        return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _pack(ds: tf.data.Dataset, length: int, window: int, pad_id: int) -> tf.data.Dataset:
    ds = ds.map(lambda ex: {"ids": ex["targets"], "w": ex["loss_mask"], "n": tf.size(ex["targets"])})
    ds = ds.padded_batch(window, padded_shapes={"ids": [length], "w": [length], "n": []},
                         padding_values={"ids": pad_id, "w": 0.0, "n": 0})

    def pack_window(ids, w, n):
        keep = [i for i in range(len(n)) if n[i] > 0]
        rows = packing.pack([ids[i, :n[i]] for i in keep], length, pad_id,
                            weights=[w[i, :n[i]] for i in keep])
        return rows["tokens"], rows["segment_ids"], rows["positions"], rows["loss_weights"]

    def rows(batch):
        tokens, segments, positions, weights = tf.numpy_function(
            pack_window, [batch["ids"], batch["w"], batch["n"]], [tf.int32] * 3 + [tf.float32],
            stateful=False)
        row = {"tokens": tokens, "segment_ids": segments, "positions": positions,
               "loss_mask": weights}
        return tf.data.Dataset.from_tensor_slices(
            {k: tf.ensure_shape(v, [None, length]) for k, v in row.items()})

    return ds.flat_map(rows)
