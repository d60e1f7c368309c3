"""Vocabulary padding that makes a converted checkpoint load at any common TP size.

megatron pads the vocabulary to a multiple of `make_vocab_size_divisible_by * TP`, and a
distributed checkpoint only loads into a model whose embedding has the same global shape. So
the padded size must not depend on TP. We choose `make_vocab_size_divisible_by = M` such that
`padded(V, M * tp) == 8 * M` for every tp dividing `max_tp` (8): M = ceil(V / 8) works whenever
V > 7 * M, true for any real vocabulary (LLaMA-2: V = 32000 -> M = 4000, padded = 32000, no
padding rows at all, so the softmax is exactly HF's). `model.vocab_size` stays the true V, so
export knows how many rows to keep.
"""

from __future__ import annotations

from soft.config.errors import ConfigError

DEFAULT_MAX_TP = 8


def _padded(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple  # same formula as soft.models.gpt.padded_vocab_size


def tp_sizes(max_tp: int) -> list[int]:
    return [tp for tp in range(1, max_tp + 1) if max_tp % tp == 0]


def stable_divisor(vocab: int, max_tp: int = DEFAULT_MAX_TP) -> tuple[int, int]:
    """(make_vocab_size_divisible_by, padded vocab), the same padded size for all tp | max_tp."""
    if vocab < 1 or max_tp < 1:
        raise ConfigError(f"vocabulary size {vocab} and max TP {max_tp} must be >= 1")
    # Candidates are M in [V / max_tp, V / (max_tp - 1)); each is checked with megatron's formula.
    for multiple in range(-(-vocab // max_tp), vocab + 1):
        sizes = {_padded(vocab, multiple * tp) for tp in tp_sizes(max_tp)}
        if sizes == {multiple * max_tp}:
            return multiple, multiple * max_tp
        if (max_tp - 1) * multiple >= vocab:
            break
    raise ConfigError(
        f"vocabulary size {vocab} is too small for one padded size at every TP size dividing "
        f"{max_tp}; convert with a smaller --max-tensor-parallel"
    )
