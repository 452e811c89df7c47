"""seqio Tasks and Mixtures: contrastive (query, positive, negatives) and LM documents.

``add_contrastive_task``, ``add_lm_task`` and ``add_instruction_task`` register
``seqio.Task``s whose source is built in Python from the readers in ``sources``
(BEIR, JSONL pairs, text files, synthesized instruction examples) or is a TFDS
dataset; ``add_mixture`` and ``add_length_mixture``
register ``seqio.Mixture``s. ``get_dataset(name, ...)`` returns the
preprocessed, tokenized examples; ``converters`` turns them into model
features.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any, Sequence

import seqio
import tensorflow as tf

from t5x_like.data import preprocessors as prep
from t5x_like.data.sources import BadRecord, BeirData
from t5x_like.data.vocab import HFTokenizerVocabulary

# ------------------------------------------------------------- contrastive examples


def beir_examples(data: BeirData, negatives: dict[str, list[str]] | None = None,
                  num_negatives: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """One example per judged (query, relevant document) pair, in (query, doc) order.

    Negatives come from ``negatives`` (mined, hardest first; see ``mining``); a
    query with too few is topped up with random unjudged corpus documents.
    """
    rng = random.Random(seed)
    doc_ids = sorted(data.corpus)
    out = []
    for qid in sorted(data.qrels):
        judged = data.qrels[qid]
        for doc_id in sorted(d for d, grade in judged.items() if grade > 0):
            picked = list((negatives or {}).get(qid, []))[:num_negatives]
            while len(picked) < num_negatives:
                candidate = doc_ids[rng.randrange(len(doc_ids))]
                if candidate not in judged and candidate not in picked:
                    picked.append(candidate)
            out.append({
                "query": data.queries[qid],
                "passages": [data.passage(doc_id)] + [data.passage(d) for d in picked],
                "instruction": "",
                "query_id": qid,
                "doc_ids": [doc_id] + picked,
            })
    if not out:
        raise BadRecord(f"{data.path}: no judged relevant (query, document) pairs")
    return out


def pair_examples(records: Sequence[dict[str, Any]], num_negatives: int = 0,
                  seed: int = 0, source: str = "pairs") -> list[dict[str, Any]]:
    """Examples from JSONL records (``sources.read_pairs``).

    Records with fewer negatives are topped up with other records' positives
    (random, seeded) unless they carry teacher ``scores``, which cannot be made up.
    """
    rng = random.Random(seed)
    positives = [r["positive"] for r in records]
    with_scores = ["scores" in r for r in records]
    if any(with_scores) and not all(with_scores):
        raise BadRecord(f"{source}: some records have teacher 'scores' and some do not")
    out = []
    for i, r in enumerate(records):
        negatives = list(r["negatives"])[:num_negatives]
        if len(negatives) < num_negatives:
            if "scores" in r:
                raise BadRecord(f"{source}: record {i + 1} has {len(r['negatives'])} negatives with "
                                f"teacher scores; num_negatives={num_negatives} needs that many")
            while len(negatives) < num_negatives and len(positives) > 1:
                j = rng.randrange(len(positives))
                if j != i:
                    negatives.append(positives[j])
        example = {"query": r["query"], "passages": [r["positive"]] + negatives,
                   "instruction": r.get("instruction", "")}
        if "scores" in r:
            example["scores"] = [float(s) for s in r["scores"][: 1 + num_negatives]]
        out.append(example)
    return out


def _examples_dataset(examples: list[dict[str, Any]]) -> tf.data.Dataset:
    columns = {"query": [e["query"] for e in examples],
               "passages": [e["passages"] for e in examples],
               "instruction": [e.get("instruction", "") for e in examples]}
    if "scores" in examples[0]:
        columns["scores"] = tf.constant([e["scores"] for e in examples], tf.float32)
    return tf.data.Dataset.from_tensor_slices(columns)


def _function_source(make_dataset, split: str) -> seqio.FunctionDataSource:
    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed  # in-memory sources: the Task shuffles examples
        return make_dataset()

    return seqio.FunctionDataSource(dataset_fn, splits=[split])


# ---------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class ContrastiveSpec:
    """How a contrastive task formats and tokenizes (lengths are per side)."""

    query_length: int = 64
    passage_length: int = 256
    query_prefix: str = ""  # E5: "query: "
    passage_prefix: str = ""  # E5: "passage: "
    instruction: str | None = None  # E5-mistral: queries become "Instruct: ...\nQuery: ..."
    append_eos: bool = False  # decoder embedders pool the EOS they end with


def _special_tokens(vocab, append_eos: bool) -> tuple[list[int], list[int]]:
    prefix, suffix = vocab.special_tokens() if isinstance(vocab, HFTokenizerVocabulary) else ([], [])
    if isinstance(vocab, seqio.SentencePieceVocabulary) and vocab.bos_id is not None and vocab.bos_id >= 0:
        prefix = [vocab.bos_id]
    if append_eos and (not suffix or suffix[-1] != vocab.eos_id):
        if vocab.eos_id is None:
            raise ValueError("append_eos=True but the vocabulary has no EOS token")
        suffix = suffix + [vocab.eos_id]
    return prefix, suffix


def _replace(name: str) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)


def add_contrastive_task(name: str, examples: list[dict[str, Any]], vocab,
                         spec: ContrastiveSpec = ContrastiveSpec(), split: str = "train",
                         cache: bool = True) -> seqio.Task:
    """Registers a seqio Task of contrastive examples (see ``beir_examples`` / ``pair_examples``).

    Output features: ``query`` ``[<= query_length]`` and ``passages``
    ``[1 + negatives, <= passage_length]`` int32 ids (positive first), plus
    teacher ``scores`` when the examples have them. ``cache`` keeps the tokenized
    examples in memory after the first epoch (truncated ids: ~4 KB an example at 1+7 x 256).
    """
    n = {len(e["passages"]) for e in examples}
    if len(n) != 1:
        raise ValueError(f"task {name!r}: examples have different passage counts {sorted(n)}")
    special = _special_tokens(vocab, spec.append_eos)
    task = seqio.Task(
        name,
        source=_function_source(lambda: _examples_dataset(examples), split),
        output_features={"query": seqio.Feature(vocab, add_eos=False),
                         "passages": seqio.Feature(vocab, add_eos=False, rank=2)},
        preprocessors=[
            functools.partial(prep.format_contrastive, query_prefix=spec.query_prefix,
                              passage_prefix=spec.passage_prefix, instruction=spec.instruction),
            functools.partial(prep.tokenize, vocabularies={"query": vocab, "passages": vocab}),
            functools.partial(prep.truncate_and_wrap,
                              lengths={"query": spec.query_length, "passages": spec.passage_length},
                              special={"query": special, "passages": special}),
            # In-memory examples: tokenize once, keep the truncated ids for later epochs
            # (tokenizing full passages is the pipeline's bottleneck).
            *([lambda ds: ds.cache()] if cache else []),
        ],
        shuffle_buffer_size=max(1, min(len(examples), 10_000)),
    )
    _replace(name)
    seqio.TaskRegistry.add_provider(name, task)
    return task


def text_documents_dataset(documents: Sequence[str]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({"text": list(documents)})


def tfds_source(tfds_name: str, text_key: str = "text", data_dir: str | None = None) -> seqio.DataSource:
    """A TFDS dataset as a document source (its ``text_key`` feature becomes ``text``)."""
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir)

    class _Renamed(seqio.DataSource):
        def __init__(self):
            super().__init__(splits=source.splits, num_input_examples=None, caching_permitted=True)

        @property
        def supports_arbitrary_sharding(self) -> bool:
            return source.supports_arbitrary_sharding

        def list_shards(self, split):
            return source.list_shards(split)

        def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kw):
            ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
            return ds.map(lambda ex: {"text": ex[text_key]})

    return _Renamed()


def add_lm_task(name: str, source: seqio.DataSource | Sequence[str], vocab, *,
                chunk_length: int, min_tokens: int = 0, max_tokens: int | None = None,
                split: str = "train", add_eos: bool = True,
                shuffle_buffer_size: int = 128) -> seqio.Task:
    """Registers a seqio Task of token documents for LM training.

    ``source``: a seqio DataSource yielding ``{"text": ...}`` or a list of texts.
    Documents get BOS / EOS as the vocabulary defines, are cut into pieces of
    ``chunk_length`` (so long documents fill whole rows), and optionally kept
    only when ``min_tokens <= tokens < max_tokens`` (for long / short mixtures).
    Examples: ``targets`` ids and ``document_tokens`` (the whole document's length).
    ``shuffle_buffer_size`` counts chunks: 128 x 8K tokens is 1M tokens held.
    """
    if not isinstance(source, seqio.DataSource):
        texts = list(source)
        if not texts:
            raise ValueError(f"task {name!r}: no documents")
        source = _function_source(lambda: text_documents_dataset(texts), split)
    prefix, suffix = _special_tokens(vocab, append_eos=add_eos)

    def wrap(ds):
        return ds.map(lambda ex: {"targets": tf.concat(
            [tf.constant(prefix, tf.int32), ex["targets"], tf.constant(suffix, tf.int32)], 0)})

    preprocessors = [
        lambda ds: ds.map(lambda ex: {"targets": ex["text"]}),
        functools.partial(prep.tokenize, vocabularies={"targets": vocab}),
        wrap,
    ]
    if min_tokens or max_tokens is not None:
        preprocessors.append(functools.partial(prep.filter_by_length, key="targets",
                                               min_tokens=min_tokens, max_tokens=max_tokens))
    preprocessors.append(functools.partial(prep.chunk, key="targets", length=chunk_length))
    # Every token trains; the mask makes these examples mix with instruction tasks.
    preprocessors.append(lambda ds: ds.map(lambda ex: {**ex, "loss_mask": tf.ones_like(ex["targets"])}))
    task = seqio.Task(name, source=source, output_features=_lm_features(vocab),
                      preprocessors=preprocessors, shuffle_buffer_size=shuffle_buffer_size)
    _replace(name)
    seqio.TaskRegistry.add_provider(name, task)
    return task


def _lm_features(vocab) -> dict[str, seqio.Feature]:
    """What LM and instruction tasks both give, so one mixture can hold both kinds."""
    def side(rank):  # kept through mixtures, which drop undeclared features
        return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, dtype=tf.int32,
                             rank=rank, required=False)

    return {"targets": seqio.Feature(vocab, add_eos=False), "document_tokens": side(0),
            "loss_mask": side(1)}


def add_instruction_task(name: str, examples: Sequence[dict[str, str]], vocab, *, length: int,
                         split: str = "train", add_eos: bool = True,
                         shuffle_buffer_size: int = 1024) -> seqio.Task:
    """Registers a seqio Task of (input, target) pairs trained with the loss on the target only.

    ``examples``: ``{"input", "target"}`` dicts (``sources.read_instruction_examples``).
    Each becomes ``targets`` = BOS + input ids + target ids + EOS (as the vocabulary
    defines them) and ``loss_mask`` = 0 over BOS and the input, 1 over the target and
    EOS; ``converters.LMConverter`` packs both and multiplies the mask into
    ``loss_weights``. Input and target are tokenized separately, so the boundary is
    exact. An example longer than ``length`` is dropped rather than cut: a cut would
    lose the answer or the context it depends on.
    """
    examples = list(examples)
    if not examples:
        raise ValueError(f"task {name!r}: no examples")
    prefix, suffix = _special_tokens(vocab, append_eos=add_eos)
    columns = {"input": [e["input"] for e in examples], "target": [e["target"] for e in examples]}

    def join(ex):
        head = tf.concat([tf.constant(prefix, tf.int32), ex["input"]], 0)
        tail = tf.concat([ex["target"], tf.constant(suffix, tf.int32)], 0)
        targets = tf.concat([head, tail], 0)
        return {"targets": targets, "document_tokens": tf.size(targets),
                "loss_mask": tf.concat([tf.zeros_like(head), tf.ones_like(tail)], 0)}

    task = seqio.Task(
        name,
        source=_function_source(lambda: tf.data.Dataset.from_tensor_slices(columns), split),
        output_features=_lm_features(vocab),
        preprocessors=[
            functools.partial(prep.tokenize, vocabularies={"input": vocab, "target": vocab}),
            lambda ds: ds.map(join),
            lambda ds: ds.filter(lambda ex: tf.size(ex["targets"]) <= length),
        ],
        shuffle_buffer_size=max(1, min(len(examples), shuffle_buffer_size)))
    _replace(name)
    seqio.TaskRegistry.add_provider(name, task)
    return task


def add_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> seqio.Mixture:
    for task, rate in tasks_and_rates:
        if task not in seqio.TaskRegistry.names() and task not in seqio.MixtureRegistry.names():
            raise KeyError(f"mixture {name!r}: unknown task {task!r}; registered: {known_names()}")
        if rate <= 0:
            raise ValueError(f"mixture {name!r}: rate {rate} for {task!r} must be > 0")
    _replace(name)
    mixture = seqio.Mixture(name, list(tasks_and_rates))
    seqio.MixtureRegistry.add_provider(name, mixture)
    return mixture


def add_length_mixture(name: str, source, vocab, *, chunk_length: int, threshold: int,
                       long_rate: float = 0.6, split: str = "train") -> seqio.Mixture:
    """Long-context recipe: documents of ``>= threshold`` tokens at ``long_rate``,
    shorter ones at ``1 - long_rate`` (tasks ``{name}_long`` / ``{name}_short``)."""
    if not 0 < long_rate < 1:
        raise ValueError(f"long_rate={long_rate} must be in (0, 1)")
    add_lm_task(f"{name}_long", source, vocab, chunk_length=chunk_length, min_tokens=threshold,
                split=split)
    add_lm_task(f"{name}_short", source, vocab, chunk_length=chunk_length, max_tokens=threshold,
                split=split)
    return add_mixture(name, [(f"{name}_long", long_rate), (f"{name}_short", 1 - long_rate)])


def known_names() -> list[str]:
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_provider(name: str):
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    raise KeyError(f"no seqio task or mixture named {name!r}; registered: {known_names()}")


def get_dataset(name: str, *, split: str = "train", shuffle: bool = True, seed: int = 0,
                shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None) -> tf.data.Dataset:
    """Tokenized examples of a task or mixture, this process's shard, deterministic for a seed."""
    provider = get_provider(name)
    shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
    kwargs = dict(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                  shard_info=shard, num_epochs=num_epochs, trim_output_features=False)
    if isinstance(provider, seqio.Mixture):
        kwargs.pop("trim_output_features")
        kwargs["log_mixing_proportions"] = False
    ds = provider.get_dataset(**kwargs)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)
