"""The books that haystacks and perplexity read: Gutenberg texts without their licence."""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------------- data


def book_files(path: str | Path) -> list[Path]:
    """``path`` itself, or the ``*.txt`` files of a directory (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.txt files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [path]


def read_book(path: Path) -> str:
    """A Gutenberg book without its header and licence; any other text file as it is."""
    from t5x_like.data.text import read_gutenberg

    try:
        return read_gutenberg(path)
    except ValueError:  # no Gutenberg markers: a plain text file
        return path.read_text(encoding="utf-8-sig")


def document_tokens(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` ids of a document (special tokens as the tokenizer adds them)."""
    # Tokenizing the whole of a 900K-token book would dominate a short run: take a prefix
    # of characters that surely holds enough tokens, and all of it if it does not.
    for chars in (max_tokens * 8, len(text)):
        ids = tokenizer.encode([text[:chars]], max_tokens)[0]
        if len(ids) >= max_tokens or chars >= len(text):
            return ids
    return ids
