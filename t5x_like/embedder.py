"""The text-embedding API: ``Embedder.from_pretrained(dir).encode(texts, prefix="query: ")``.

An ``Embedder`` holds a model, its parameters, its tokenizer and how hidden states
become vectors (``models.pooling``). It loads a Hugging Face / sentence-transformers
directory, formats texts (E5 prefixes, E5-mistral instructions), sorts them by length
into padded batches of a few bucketed lengths, and embeds them.
``python -m t5x_like.embed`` is the command-line form.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from t5x_like import models
from t5x_like.models.decoder import DecoderConfig
from t5x_like.models.pooling import POOLINGS, finish, hidden_states, pool
from t5x_like.partitioning import Partitioner

E5_QUERY_PREFIX = "query: "
E5_PASSAGE_PREFIX = "passage: "


def instruction_query(task: str, query: str) -> str:
    """E5-mistral's query format; passages get no instruction."""
    return f"Instruct: {task}\nQuery: {query}"


def format_texts(texts: Sequence[str], prefix: str | None = None,
                 instruction: str | None = None) -> list[str]:
    if prefix is not None and instruction is not None:
        raise ValueError("give either prefix (E5: 'query: ' / 'passage: ') or instruction "
                         "(E5-mistral), not both")
    if instruction is not None:
        return [instruction_query(instruction, t) for t in texts]
    return [(prefix or "") + t for t in texts]


def bucket_length(n: int) -> int:
    """Padded length for ``n`` tokens: powers of two from 16 to 256, then multiples of 256,
    so a whole corpus compiles a handful of shapes and wastes < 2x on padding."""
    if n <= 256:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 256) * 256


def default_max_length(config: models.ModelConfig) -> int:
    if isinstance(config, DecoderConfig):
        return min(config.max_position_embeddings, 4096)
    # XLM-R positions start after the padding id, which uses up pad_token_id + 1 slots.
    offset = config.pad_token_id + 1 if config.model_type == "xlm-roberta" else 0
    return min(512, config.max_position_embeddings - offset)


@dataclasses.dataclass
class Embedder:
    """A model, its parameters and tokenizer, and how to turn hidden states into vectors."""

    config: models.ModelConfig
    params: dict
    tokenizer: object  # convert.tokenizer.TextTokenizer
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 512
    append_eos: bool = False  # append EOS before last-token pooling (E5-mistral)
    padding_side: str = "right"
    # A Mesh or partitioning.Partitioner: parameters split by the rules (fsdp / tensor),
    # rows over the batch axes, so a model larger than one device embeds over many.
    mesh: Any = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={self.padding_side!r} must be 'left' or 'right'")
        self.module = models.build(self.config)
        self.partitioner = Partitioner.of(self.mesh)
        self._placed: tuple[int, Any] | None = None  # (id of self.params, them on the mesh)
        if self.partitioner is None:
            self._forward = jax.jit(self._embed_batch, static_argnums=(3, 4))
            return
        shapes, specs = models.abstract_params(self.config)
        self._param_shardings = self.partitioner.param_shardings(specs, shapes)
        rows = self.partitioner.batch_sharding(2)
        self._forward = jax.jit(self._embed_batch, static_argnums=(3, 4),
                                in_shardings=(self._param_shardings, rows, rows),
                                out_shardings=rows)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        dtype: str = "float32",
        attention: str = "xla",
        causal: bool | None = None,
        **kwargs,
    ) -> "Embedder":
        """Loads a Hugging Face / sentence-transformers directory.

        Pooling, normalisation and max length default to the directory's
        sentence-transformers settings (``1_Pooling/config.json``, a ``Normalize``
        module, ``sentence_bert_config.json``); otherwise mean pooling for
        encoders and last-token pooling (EOS appended) for decoders.
        ``causal=False`` makes a decoder bidirectional; ``mesh=`` (a Mesh or a
        ``Partitioner``) embeds sharded.
        """
        from t5x_like.convert import hf, sentence_transformers
        from t5x_like.convert import tokenizer as tok

        path = Path(path)
        config, params = hf.load_hf(path)
        overrides = {"dtype": dtype, "attention": attention}
        if causal is not None:
            if not isinstance(config, DecoderConfig):
                raise ValueError("causal= applies to decoder models only")
            overrides["causal"] = causal
        config = dataclasses.replace(config, **overrides)
        st = sentence_transformers.settings(path)
        decoder = isinstance(config, DecoderConfig)
        pooling = pooling or st.get("pooling") or ("last" if decoder else "mean")
        if normalize is None:
            normalize = st.get("normalize", True)
        if max_length is None:
            max_length = st.get("max_length") or default_max_length(config)
        kwargs.setdefault("append_eos", decoder and pooling == "last")
        return cls(config, params, tok.load_tokenizer(path, hf.read_hf_config(path)),
                   pooling=pooling, normalize=normalize, max_length=max_length, **kwargs)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        return self.tokenizer.encode(texts, max_length or self.max_length, add_eos=self.append_eos)

    def encode(
        self,
        texts: Sequence[str],
        *,
        prefix: str | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        dim: int | None = None,
        show_progress: bool | None = None,
    ) -> np.ndarray:
        """``[len(texts), dim]`` float32 embeddings, in the order of ``texts``.

        ``prefix`` is prepended (E5: ``"query: "`` / ``"passage: "``);
        ``instruction`` formats queries as ``Instruct: {instruction}\\nQuery: {text}``.
        Texts are sorted by length and batched so padding stays small.
        """
        from tqdm.auto import tqdm

        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        ids = self.tokenize(format_texts(texts, prefix, instruction), max_length)
        params, rows_per_batch = self._params_on_mesh(), batch_size
        if self.partitioner is not None:  # every batch shard gets whole rows
            rows_per_batch = self.partitioner.padded_rows(batch_size)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        out: np.ndarray | None = None
        starts = range(0, len(ids), batch_size)
        if show_progress is None:
            show_progress = len(starts) > 1
        for start in tqdm(starts, desc="embedding", unit="batch", disable=not show_progress):
            rows = order[start:start + batch_size]
            tokens, mask = self._pad([ids[i] for i in rows], rows_per_batch)
            vecs = np.asarray(self._run(params, tokens, mask, dim))
            if out is None:
                out = np.zeros((len(ids), vecs.shape[-1]), np.float32)
            out[rows] = vecs[: len(rows)]
        if out is None:
            width = dim or self.config.embed_dim
            return np.zeros((0, width), np.float32)
        return out

    def _params_on_mesh(self):
        """``self.params`` (reassigned by the training hooks), placed once on the mesh."""
        if self.partitioner is None:
            return self.params
        if self._placed is None or self._placed[0] != id(self.params):
            self._placed = (id(self.params), self.partitioner.place(self.params, self._param_shardings))
        return self._placed[1]

    def _run(self, params, tokens, mask, dim):
        if self.partitioner is None:
            return self._forward(params, tokens, mask, self.normalize, dim)
        with self.partitioner.scope():
            return self._forward(params, tokens, mask, self.normalize, dim)

    def _pad(self, rows: list[list[int]], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        longest = max(len(r) for r in rows)
        # Never pad past max_length: position tables end there.
        length = min(bucket_length(longest), max(self.max_length, longest))
        tokens = np.full((batch_size, length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, r in enumerate(rows):
            span = slice(0, len(r)) if self.padding_side == "right" else slice(length - len(r), length)
            tokens[i, span] = r
            mask[i, span] = 1
        return tokens, mask

    def _embed_batch(self, params, tokens, mask, normalize: bool, dim: int | None):
        hidden = self.hidden_states(params, tokens, mask)
        return finish(pool(hidden, mask, self.pooling), normalize=normalize, dim=dim)

    def hidden_states(self, params, tokens, mask):
        """Final hidden states ``[batch, length, dim]`` for padded tokens and their mask."""
        return hidden_states(self.module, params, tokens, mask)
