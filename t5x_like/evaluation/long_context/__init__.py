r"""Long-context probes for any decoder checkpoint: passkey, needle in a haystack, perplexity.

  python -m t5x_like.evaluation.long_context passkey --model DIR [--tokenizer PATH] \
      [--lengths 1024,2048,4096] [--depths 0,0.25,0.5,0.75,1] [--trials 5] [--output DIR]
  python -m t5x_like.evaluation.long_context niah --model DIR [--books DIR_or_file] ...
  python -m t5x_like.evaluation.long_context perplexity --model DIR [--books ...] [--stride N]

Common flags: ``--batch-size``, ``--attention`` (e.g. ``chunked`` for long inputs),
``--dtype``, ``--seed``. Every flag is checked, and the tokenizer and books read, before a
model loads; an error names its flag.

* **Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark Attention"): the landmark
  prompt, the filler repeated to the requested token length, the needle "The pass key is
  {k}. Remember it. {k} is the pass key." at a fraction ``depth`` of the haystack, then
  "What is the pass key? The pass key is" and the 5-digit answer.
* **Needle in a haystack** over a length x depth grid, the haystack a real book.
* **Perplexity versus context length** with a sliding window (each token counted once).

Passkey and needle trials are scored by *teacher forcing*: the answer tokens are part of
the input, a trial is correct when the argmax at every answer position is the answer
token (exact match), and the mean log-likelihood of the answer tokens is reported too
(more informative for small models). No generation is needed. A ``length`` is the whole
input the model sees, answer included, so a trial at 4096 fits a 4096-token window.

Rows are padded to a few bucketed lengths (``bucket_length``) so a grid compiles few
shapes; padding has segment id 0, position 0 and loss weight 0 and never changes a result
(causal attention: real tokens never see the padding behind them). Losses come from the
hidden states through ``objectives.lm.chunked_cross_entropy``, so full ``[batch, length,
vocab]`` logits never exist.

The package: ``prompts`` (passkey and needle trials), ``books``, ``windows`` (sliding
windows, padded batches), ``scoring`` (``LMScorer``: per-row sums, sharded with
``mesh=``), ``runners`` (the three probes over their grids), ``plots`` and ``cli``.
"""

from t5x_like.evaluation.long_context.books import book_files, document_tokens, read_book
from t5x_like.evaluation.long_context.cli import build_parser, check_args, main
from t5x_like.evaluation.long_context.plots import plot_grid, plot_perplexity, save_figure, write_json
from t5x_like.evaluation.long_context.prompts import (
                                                    NIAH_ANSWER,
                                                    NIAH_NEEDLE,
                                                    NIAH_QUESTION,
                                                    PASSKEY_FILLER,
                                                    PASSKEY_INTRO,
                                                    PASSKEY_NEEDLE,
                                                    PASSKEY_QUESTION,
                                                    NeedlePrompts,
                                                    PasskeyPrompts,
                                                    PieceTokenizer,
                                                    Probe,
                                                    build_probe,
                                                    fill_haystack,
                                                    needle_offset,
                                                    passkey_key,
                                                    split_sentences,
)
from t5x_like.evaluation.long_context.runners import grid_means, run_niah, run_passkey, run_perplexity
from t5x_like.evaluation.long_context.scoring import LMScorer, count_windows, score_probes, sliding_window_nll
from t5x_like.evaluation.long_context.windows import (
                                                    Batch,
                                                    Window,
                                                    answer_weights,
                                                    bucket_length,
                                                    make_batch,
                                                    sliding_windows,
                                                    window_weights,
)

__all__ = [
    "NIAH_ANSWER", "NIAH_NEEDLE", "NIAH_QUESTION", "PASSKEY_FILLER", "PASSKEY_INTRO",
    "PASSKEY_NEEDLE", "PASSKEY_QUESTION", "Batch", "LMScorer", "NeedlePrompts", "PasskeyPrompts",
    "PieceTokenizer", "Probe", "Window", "answer_weights", "book_files", "bucket_length",
    "build_parser", "build_probe", "check_args", "count_windows", "document_tokens",
    "fill_haystack", "grid_means", "main", "make_batch", "needle_offset", "passkey_key",
    "plot_grid", "plot_perplexity", "read_book", "run_niah", "run_passkey", "run_perplexity",
    "save_figure", "score_probes", "sliding_window_nll", "sliding_windows", "split_sentences",
    "window_weights", "write_json",
]
