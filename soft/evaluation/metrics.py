"""TriviaQA exact match: case-sensitive as in the SoFT paper, and SQuAD-normalised."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, aliases: Iterable[str], normalized: bool = False) -> bool:
    """A hit on any alias. Case-sensitive mode only strips surrounding whitespace (the
    generated answer starts with the space that follows "Answer:")."""
    if normalized:
        pred = normalize_answer(prediction)
        return any(pred == normalize_answer(a) for a in aliases)
    pred = prediction.strip()
    return any(pred == a.strip() for a in aliases)
