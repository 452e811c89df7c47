"""Long-context data synthesis: bootstrap long-input and long-output instruction data.

The agent workflow of "Bootstrap Your Own Context Length" (Wang et al., 2024):
a short-context LM (``lm``: our decoder or an OpenAI-compatible server), a
retriever (``retrieval``: BM25 or our embedder) and a document collection give
instruction examples whose input is far longer than the LM's window
(``workflow``), written as resumable JSONL (``io``) that
``t5x_like.data.sources.read_instruction_examples`` and
``t5x_like.data.tasks.add_instruction_task`` read back for training with the
loss on the answer only. ``python -m t5x_like.synthesis --config=configs/synthesis.py``
runs it (see ``__main__``).

Nothing here imports TensorFlow, and JAX only when a local LM or embedder is used.
"""

from t5x_like.synthesis.lm import HTTPLM, LanguageModel, LocalLM, tokenizer_counter
from t5x_like.synthesis.retrieval import BM25Retriever, DenseRetriever, Retriever, load_documents
from t5x_like.synthesis.workflow import Settings, Workflow, check_budget

__all__ = ["BM25Retriever", "DenseRetriever", "HTTPLM", "LanguageModel", "LocalLM", "Retriever",
           "Settings", "Workflow", "check_budget", "load_documents", "tokenizer_counter"]
