"""Plain-text sources: Project Gutenberg books with their header and licence removed."""

from __future__ import annotations

import pathlib
import re

_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.M)


def strip_gutenberg(text: str, source: str = "<text>") -> str:
    """The body of a Gutenberg book: between the START and END markers.

    Raises if the markers are missing, since a book with its licence left in
    would quietly pollute long-context data.
    """
    start, end = _START.search(text), _END.search(text)
    if not start or not end or end.start() < start.end():
        raise ValueError(
            f"{source}: no '*** START OF ... PROJECT GUTENBERG EBOOK' / '*** END OF ...' markers; "
            "is this a Project Gutenberg text?"
        )
    return text[start.end() : end.start()].strip().lstrip("\ufeff")


def read_gutenberg(path: str | pathlib.Path) -> str:
    path = pathlib.Path(path)
    return strip_gutenberg(path.read_text(encoding="utf-8-sig"), source=str(path))


def paragraphs(text: str, min_chars: int = 1) -> list[str]:
    """Blank-line separated paragraphs with internal line breaks joined."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if len(para) >= min_chars:
            out.append(para)
    return out
