"""Batched evaluation (soft.evaluation.batched) against the one-example code paths, which are
written independently (exit_nll: one unpadded forward; greedy_generate: our own layer driver).

Tolerances, fp32 on CPU: losses rel 1e-5 (padding changes matmul shapes, hence summation
order; observed ~5e-7); generated tokens identical (tiny_llama's peaked logits leave no ties).
"""

from __future__ import annotations

import random

import pytest
import torch
from eval_helpers import tiny_llama
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from soft.config.errors import ConfigError
from soft.evaluation import (
    LayerRunner,
    evaluate_exits,
    exit_nll,
    greedy_generate,
    load_eval_examples,
    load_exported_model,
    tokenize_example,
)
from soft.evaluation.batched import SubModels, exit_nll_batch, generate_batch, length_batches

EXITS = [1, 2, 4, 6]
STOPS = {2, 13}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=7)


@pytest.fixture(scope="module")
def ict_heads(model):
    """Own norm + head for exits 2 and 4, as an ICT export has."""
    gen = torch.Generator().manual_seed(3)
    heads = {}
    for k in (2, 4):
        norm = LlamaRMSNorm(64, eps=model.config.rms_norm_eps)
        head = nn.Linear(64, model.config.vocab_size, bias=False)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen))
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.5)
        heads[k] = (norm.eval(), head.eval())
    return heads


def _sequences(n: int = 9, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    seqs = [[1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(2, 50))] for _ in range(n)]
    return seqs, [rng.randrange(1, len(s)) for s in seqs]


@pytest.mark.parametrize("with_heads", [False, True])
def test_batched_losses_equal_one_example_at_a_time(model, ict_heads, with_heads):
    heads = ict_heads if with_heads else None
    seqs, targets = _sequences()
    batched = exit_nll_batch(model, seqs, targets, EXITS, heads, pad_id=0)
    for seq, t, got in zip(seqs, targets, batched, strict=True):
        want = exit_nll(model, seq, t, EXITS, heads)
        for k in EXITS:
            assert got[k][1] == want[k][1] == t
            assert got[k][0] == pytest.approx(want[k][0], rel=1e-5), k


@pytest.mark.parametrize("with_heads", [False, True])
def test_left_padded_generation_equals_one_prompt_at_a_time(model, ict_heads, with_heads):
    heads = ict_heads if with_heads else {}
    seqs, targets = _sequences(seed=1)
    prompts = [s[: len(s) - t] for s, t in zip(seqs, targets, strict=True)]
    views, runner = SubModels(model, heads), LayerRunner(model, heads)
    differ = set()
    for k in EXITS:
        got, elapsed = generate_batch(views(k), prompts, 10, STOPS, pad_id=0)
        want = [greedy_generate(runner, p, 10, k, STOPS).token_ids for p in prompts]
        assert got == want, k
        assert elapsed > 0
        differ.add(tuple(map(tuple, got)))
    assert len(differ) == len(EXITS)  # the exits really are different models
    assert views(6) is model and views(2) is views(2)
    assert model.config.num_hidden_layers == 6  # the views left the model alone


def test_length_batches_group_similar_lengths():
    assert length_batches([3, 9, 1, 7, 5], 2) == [[1, 3], [4, 0], [2]]


def test_evaluate_exits_batched_equals_unbatched(export_dir, shared_data):
    exported = load_exported_model(export_dir, device="cpu", dtype="float32")
    path = shared_data / "triviaqa" / "triviaqa_rc_train_0-1499.jsonl"
    examples = [
        tokenize_example(exported.tokenizer, e) for e in load_eval_examples(path, "triviaqa", 11)
    ]
    common = dict(max_new_tokens=6, score_exact_match=True, stop_at_newline=True, progress=False)
    one = evaluate_exits(exported, examples, [2, 4], batch_size=1, **common)
    many = evaluate_exits(exported, examples, [2, 4], batch_size=4, **common)
    assert one.per_example == many.per_example
    for a, b in zip(one.records, many.records, strict=True):
        assert a.layer == b.layer and a.generated_tokens == b.generated_tokens
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.exact_match == b.exact_match
    with pytest.raises(ConfigError, match="--batch-size: expected >= 1"):
        evaluate_exits(exported, examples, [2], batch_size=0, **common)
