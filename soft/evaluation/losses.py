"""Per-exit loss on response tokens from ONE forward pass with all hidden states (each early
exit through its own ICT head when it has one, else through the shared norm + head)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from soft.config.errors import ConfigError
from soft.data.prompts import RenderError, render
from soft.data.tokenizer import Tokenizer
from soft.evaluation.records import EvalExample

if TYPE_CHECKING:
    from soft.evaluation.causal_lm import CausalLM

# Which ids of an example are scored: the last N, or [start, end) spans of positions.
Targets = int | Sequence[tuple[int, int]]


@dataclass
class TokenizedExample:
    """`loss_ids`: the example's rendered ids through its last target; the loss is on
    `targets` ([start, end) spans of loss_ids: the response and EOS, or every assistant turn).
    `prompt_ids`: what generation is fed (the ids before the last target)."""

    loss_ids: list[int]
    targets: list[tuple[int, int]]
    prompt_ids: list[int]
    answers: list[str] = field(default_factory=list)

    @property
    def num_target(self) -> int:
        return len(target_positions(len(self.loss_ids), self.targets))


def target_positions(length: int, targets: Targets) -> list[int]:
    """Indices j of the scored ids (each predicted at position j - 1; never j = 0)."""
    if isinstance(targets, int):
        return list(range(length - targets, length))
    return [j for start, end in targets for j in range(max(start, 1), end)]


def tokenize_example(tokenizer: Tokenizer, example: EvalExample) -> TokenizedExample:
    """The ids training would see for this example (soft.data.prompts.render: with the
    Alpaca template the response split off the joint encoding, EOS after it as a target)."""
    try:
        rendered = render(tokenizer, example.example)
    except RenderError as exc:
        raise ConfigError(f"evaluation example: {exc}") from exc
    if not rendered.targets:
        raise ConfigError(
            "evaluation example has no target (a conversation must end with an assistant turn)"
        )
    end = rendered.targets[-1][1]
    return TokenizedExample(
        rendered.ids[:end], list(rendered.targets), rendered.prompt_ids, list(example.answers)
    )


@torch.inference_mode()
def exit_nll(
    model: CausalLM,
    loss_ids: Sequence[int],
    targets: Targets,
    exits: Sequence[int],
    exit_heads: Mapping[int, tuple[nn.Module, nn.Module]] | None = None,
) -> dict[int, tuple[float, int]]:
    """Summed NLL and token count of the `targets` ids (the last N, or spans), for every exit.

    Exit k < L: HF's `hidden_states[k]` (output of decoder layer k, pre-norm) through
    `exit_heads[k]` = (norm, lm_head) when given (ICT), else `model.model.norm` and `lm_head`.
    Exit L: transformers 5.x returns `hidden_states[-1]` already normed (the same tensor the
    head saw), so the model's own logits are used.
    """
    heads = exit_heads or {}
    num_layers = int(model.config.num_hidden_layers)
    device = model.lm_head.weight.device
    ids = torch.as_tensor(list(loss_ids), dtype=torch.long, device=device)[None]
    positions = target_positions(len(loss_ids), targets)
    first = positions[0]
    labels = ids[0, positions]
    # Positions first-1 .. -1 hold every prediction of a target; logits_to_keep avoids a
    # full-vocab projection of the prompt.
    out = model(
        ids, output_hidden_states=True, use_cache=False, logits_to_keep=len(loss_ids) - first + 1
    )
    before = torch.as_tensor([p - 1 for p in positions], device=device)
    result: dict[int, tuple[float, int]] = {}
    for k in exits:
        if k == num_layers:
            logits = out.logits[0, before - (first - 1)]
        else:
            hidden = out.hidden_states[k][0, before]
            norm, lm_head = heads.get(k, (model.model.norm, model.lm_head))
            logits = lm_head(norm(hidden))
        nll = F.cross_entropy(logits.float(), labels, reduction="sum").item()
        result[k] = (nll, len(positions))
    return result
