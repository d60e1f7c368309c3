"""Per-exit loss on response tokens from ONE forward pass with all hidden states (each early
exit through its own ICT head when it has one, else through the shared norm + head)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from soft.data.tokenizer import Tokenizer
from soft.evaluation.records import EvalExample


@dataclass
class TokenizedExample:
    """`loss_ids` = BOS + prompt + response + EOS with the loss on the last `num_target` ids;
    `prompt_ids` = BOS + prompt, what generation is fed."""

    loss_ids: list[int]
    num_target: int
    prompt_ids: list[int]
    answers: list[str] = field(default_factory=list)


def tokenize_example(tokenizer: Tokenizer, example: EvalExample) -> TokenizedExample:
    # encode_pair splits the joint encoding like training does (no dummy-prefix space on the
    # response); EOS after the response is a target, as in training.
    prompt_part, response = tokenizer.encode_pair(example.prompt, example.target)
    target = [*response, tokenizer.eos_id]
    loss_ids = [tokenizer.bos_id, *prompt_part, *target]
    prompt_ids = tokenizer.encode(example.prompt, bos=True)
    return TokenizedExample(loss_ids, len(target), prompt_ids, list(example.answers))


@torch.inference_mode()
def exit_nll(
    model: LlamaForCausalLM,
    loss_ids: Sequence[int],
    num_target: int,
    exits: Sequence[int],
    exit_heads: Mapping[int, tuple[nn.Module, nn.Module]] | None = None,
) -> dict[int, tuple[float, int]]:
    """Summed NLL and token count of the last `num_target` ids, for every exit.

    Exit k < L: HF's `hidden_states[k]` (output of decoder layer k, pre-norm) through
    `exit_heads[k]` = (norm, lm_head) when given (ICT), else `model.model.norm` and `lm_head`.
    Exit L: transformers 5.x returns `hidden_states[-1]` already normed (the same tensor the
    head saw), so the model's own logits are used.
    """
    heads = exit_heads or {}
    num_layers = int(model.config.num_hidden_layers)
    device = model.lm_head.weight.device
    ids = torch.as_tensor(list(loss_ids), dtype=torch.long, device=device)[None]
    labels = ids[0, -num_target:]
    # Positions -num_target-1 .. -2 predict the target tokens; logits_to_keep avoids a full-vocab
    # projection of the prompt.
    out = model(ids, output_hidden_states=True, use_cache=False, logits_to_keep=num_target + 1)
    result: dict[int, tuple[float, int]] = {}
    for k in exits:
        if k == num_layers:
            logits = out.logits[0, :-1]
        else:
            hidden = out.hidden_states[k][0, -num_target - 1 : -1]
            norm, lm_head = heads.get(k, (model.model.norm, model.lm_head))
            logits = lm_head(norm(hidden))
        nll = F.cross_entropy(logits.float(), labels, reduction="sum").item()
        result[k] = (nll, num_target)
    return result
