"""The short-context language model the workflow drives: a small protocol, two implementations.

* ``LocalLM``: our decoder (``t5x_like.generate``) with its own tokenizer. Prompts
  are padded to a few bucket widths and a fixed batch size, so a run compiles a
  handful of programs instead of one per prompt length.
* ``HTTPLM``: an OpenAI-compatible server (vLLM, llama.cpp, TGI, ...) through
  ``/v1/chat/completions`` or ``/v1/completions`` with ``urllib`` only.

The workflow only needs ``complete``, ``count_tokens`` and ``window`` (prompt plus
generated tokens the model can attend to), so any other backend is a small class.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np


class LanguageModel(Protocol):
    """What the synthesis workflow asks of a model."""

    window: int  # prompt + generated tokens the model handles

    def complete(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """One continuation per prompt (the generated text only)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` alone (no BOS / EOS), as the model's tokenizer splits it."""
        ...


def _special_overhead(tokenizer) -> int:
    """Ids a tokenizer adds around any text (BOS, ...): the length of an empty encode."""
    return len(tokenizer.encode([""], 1 << 24)[0])


class LocalLM:
    """``t5x_like.generate`` on a decoder held in memory.

    ``batch_size`` prompts go through one compiled program; prompt widths are
    rounded up to a multiple of ``bucket`` tokens. Sampling is seeded per call
    (``seed`` plus a call counter), so a re-run reproduces its outputs.
    """

    def __init__(self, config, params, tokenizer, *, window: int | None = None,
                 batch_size: int = 8, bucket: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, mesh=None):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.window = int(window or config.max_position_embeddings)
        if self.window > config.max_position_embeddings:
            raise ValueError(f"window={self.window} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        self.batch_size, self.bucket = batch_size, bucket
        self.temperature, self.top_p, self.seed, self.mesh = temperature, top_p, seed, mesh
        self._overhead = _special_overhead(tokenizer)
        self._calls = 0

    @classmethod
    def from_directory(cls, path: str | Path, **kwargs) -> "LocalLM":
        """A Hugging Face decoder directory (weights + tokenizer), as ``generate_text`` reads it."""
        from t5x_like.convert import hf
        from t5x_like.convert.tokenizer import load_tokenizer

        config, params = hf.load_hf(path)
        return cls(config, params, load_tokenizer(path, hf.read_hf_config(Path(path))), **kwargs)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode([text], 1 << 24)[0]) - self._overhead

    def complete(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        if not prompts:
            return []
        limit = self.window - max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                             f"the window of {self.window}")
        ids = self.tokenizer.encode(list(prompts), limit)
        out: list[str] = []
        for start in range(0, len(ids), self.batch_size):
            out += self._batch(ids[start:start + self.batch_size], max_new_tokens, limit)
        return out

    def _batch(self, rows: list[list[int]], max_new_tokens: int, limit: int) -> list[str]:
        from t5x_like import generate as gen

        width = min(limit, self.bucket * math.ceil(max(map(len, rows)) / self.bucket))
        pad = self.tokenizer.pad_id
        tokens = np.full((self.batch_size, width), pad, np.int32)
        lengths = np.ones((self.batch_size,), np.int32)  # filler rows: one pad token
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
            lengths[i] = len(r)
        eos = self.tokenizer.eos_id
        result = gen.generate(self.config, self.params, tokens, max_new_tokens=max_new_tokens,
                              temperature=self.temperature, top_p=self.top_p,
                              stop_tokens=() if eos is None else (eos,), pad_id=pad,
                              seed=self.seed + self._calls, prompt_lengths=lengths, mesh=self.mesh)
        self._calls += 1
        return [self.tokenizer.decode(result.tokens[i, :result.lengths[i]].tolist()).strip()
                for i in range(len(rows))]


class HTTPLM:
    """An OpenAI-compatible completion server.

    ``api="chat"`` posts ``{"model", "messages": [{"role": "user", ...}], "max_tokens",
    "temperature"}`` to ``{base_url}/v1/chat/completions`` and reads
    ``choices[0].message.content``; ``api="completions"`` posts ``{"prompt": ...}``
    to ``/v1/completions`` and reads ``choices[0].text``. ``count_tokens`` should be
    the served model's tokenizer (``tokenizer_counter``); without one, a rough
    4-characters-a-token estimate is used, so leave headroom in the window.
    Transient failures (connection errors, HTTP 429 / 5xx) are retried with backoff.
    Up to ``concurrency`` requests are in flight at once (servers batch them).
    """

    def __init__(self, base_url: str, model: str, *, window: int, api: str = "chat",
                 count_tokens: Callable[[str], int] | None = None, temperature: float = 0.7,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, retries: int = 3,
                 concurrency: int = 8):
        if api not in ("chat", "completions"):
            raise ValueError(f"api={api!r} must be 'chat' or 'completions'")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.window, self.api = model, int(window), api
        self.temperature, self.timeout, self.retries = temperature, timeout, retries
        self.concurrency = max(1, concurrency)
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self._count = count_tokens or (lambda text: math.ceil(len(text) / 4))

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def complete(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        if len(prompts) <= 1 or self.concurrency == 1:
            return [self._one(p, max_new_tokens) for p in prompts]
        with ThreadPoolExecutor(min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(lambda p: self._one(p, max_new_tokens), prompts))

    def _one(self, prompt: str, max_new_tokens: int) -> str:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens,
                                "temperature": self.temperature}
        if self.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            reply = self._post("/v1/chat/completions", body)
            return _choice(reply, lambda c: c["message"]["content"]).strip()
        body["prompt"] = prompt
        reply = self._post("/v1/completions", body)
        return _choice(reply, lambda c: c["text"]).strip()

    def _post(self, route: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.base_url + route, json.dumps(body).encode("utf-8"),
                                         headers, method="POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if (e.code != 429 and e.code < 500) or attempt == self.retries:
                    raise RuntimeError(f"{self.base_url + route}: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.retries:
                    raise RuntimeError(f"{self.base_url + route}: {e}") from None
            time.sleep(min(2 ** attempt, 30))
        raise AssertionError("unreachable")


def _choice(reply: dict, read: Callable[[dict], Any]) -> str:
    """The first choice's text; a reply without one is an error quoting the reply."""
    try:
        text = read(reply["choices"][0])
    except (KeyError, IndexError, TypeError):
        raise RuntimeError(f"unexpected completion reply: {json.dumps(reply)[:500]}") from None
    return text if isinstance(text, str) else ""


def tokenizer_counter(path: str | Path) -> Callable[[str], int]:
    """``count_tokens`` from a local tokenizer (``tokenizer.json`` / ``.model`` / model dir)."""
    from t5x_like.convert.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    overhead = _special_overhead(tokenizer)
    return lambda text: len(tokenizer.encode([text], 1 << 24)[0]) - overhead


__all__ = ["HTTPLM", "LanguageModel", "LocalLM", "tokenizer_counter"]
