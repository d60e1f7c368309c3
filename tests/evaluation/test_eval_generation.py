"""Greedy, exit, speculative and dynamic decoding against independent HF references."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import hf_greedy, tiny_llama, truncated_copy

from soft.evaluation import LayerRunner, dynamic_generate, greedy_generate, speculative_generate

PROMPTS = [[1, 15043, 3186], [1, 450, 4996, 17354, 1701, 29916, 432, 17204], [1]]
N = 12


@pytest.fixture(scope="module")
def random_model():
    """Exits disagree with the full model almost always (random weights); float64 so that
    chunked vs one-token attention cannot flip an argmax."""
    return tiny_llama(seed=3).double()


@pytest.fixture(scope="module")
def agreeing_model():
    """Deep layers damped: shallow exits agree often but not always (GQA off: kv heads = 4)."""
    return tiny_llama(seed=4, kv_heads=4, deep_scale=0.15).double()


@pytest.fixture(scope="module")
def references(random_model, agreeing_model):
    return {
        name: [hf_greedy(model, p, N) for p in PROMPTS]
        for name, model in (("random", random_model), ("agreeing", agreeing_model))
    }


def test_full_mode_equals_hf_generate(random_model, references):
    runner = LayerRunner(random_model)
    for prompt, ref in zip(PROMPTS, references["random"], strict=True):
        assert greedy_generate(runner, prompt, N).token_ids == ref


def test_float32_full_mode_equals_hf_generate():
    model = tiny_llama(seed=5)
    assert greedy_generate(LayerRunner(model), PROMPTS[1], N).token_ids == hf_greedy(
        model, PROMPTS[1], N
    )


@pytest.mark.parametrize("k", [1, 2, 4])
def test_exit_generation_equals_truncated_model(random_model, k):
    runner = LayerRunner(random_model)
    reference = truncated_copy(random_model, k)
    for prompt in PROMPTS:
        assert greedy_generate(runner, prompt, N, exit_layer=k).token_ids == hf_greedy(
            reference, prompt, N
        )


def test_exits_really_differ(random_model, references):
    runner = LayerRunner(random_model)
    assert greedy_generate(runner, PROMPTS[0], N, exit_layer=2).token_ids != references["random"][0]


@pytest.mark.parametrize("name", ["random", "agreeing"])
@pytest.mark.parametrize(("draft_exit", "num_draft"), [(1, 1), (2, 3), (3, 5), (5, 2), (6, 2)])
def test_speculative_equals_full_greedy(name, draft_exit, num_draft, request, references):
    model = request.getfixturevalue(f"{name}_model")
    runner = LayerRunner(model)
    for prompt, ref in zip(PROMPTS, references[name], strict=True):
        result = speculative_generate(runner, prompt, N, draft_exit, num_draft)
        assert result.token_ids == ref
        assert 0.0 <= result.stats["acceptance_rate"] <= 1.0


def test_speculative_acceptance_rates_span_the_range(random_model, agreeing_model):
    """The tests above must cover full rejection, partial and full acceptance."""
    low = speculative_generate(LayerRunner(random_model), PROMPTS[1], N, 1, 4).stats
    mid = speculative_generate(LayerRunner(agreeing_model), PROMPTS[1], N, 2, 4).stats
    top = speculative_generate(LayerRunner(agreeing_model), PROMPTS[1], N, 6, 4).stats
    assert low["acceptance_rate"] < 0.3
    assert 0.2 < mid["acceptance_rate"] < 1.0, mid
    assert top["acceptance_rate"] == 1.0


def test_speculative_stops_at_stop_token_and_budget(random_model, references):
    runner = LayerRunner(random_model)
    ref = references["random"][1]
    stop = ref[4]
    first = ref.index(stop)
    out = speculative_generate(runner, PROMPTS[1], N, 2, 4, stop_ids={stop}).token_ids
    assert out == ref[: first + 1]
    assert speculative_generate(runner, PROMPTS[1], 5, 3, 4).token_ids == ref[:5]
    assert greedy_generate(runner, PROMPTS[1], N, stop_ids={stop}).token_ids == ref[: first + 1]


def test_dynamic_threshold_one_is_full_model(random_model, references):
    runner = LayerRunner(random_model)
    for prompt, ref in zip(PROMPTS, references["random"], strict=True):
        result = dynamic_generate(runner, prompt, N, [2, 4, 6], [1.0])
        assert result.token_ids == ref
        assert result.stats["average_exit_depth"] == 6.0


def test_dynamic_threshold_zero_is_shallowest_exit(random_model):
    runner = LayerRunner(random_model)
    for prompt in PROMPTS:
        result = dynamic_generate(runner, prompt, N, [2, 4, 6], [0.0, 0.0])
        assert result.token_ids == greedy_generate(runner, prompt, N, exit_layer=2).token_ids
        assert result.stats["average_exit_depth"] == 2.0


def _oracle_dynamic(model, prompt: list[int], n: int, exits: list[int], thresholds: list[float]):
    """Cache-free reference: every step reruns the whole sequence through plain HF and applies
    the exit rule to the last position, so skipped layers' K/V are always the exact ones."""
    seq, depths = list(prompt), []
    num_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for _ in range(n):
            out = model(torch.tensor([seq]), output_hidden_states=True)
            for i, k in enumerate(exits):
                if k == num_layers:
                    logits = out.logits[0, -1]
                else:
                    logits = model.lm_head(model.model.norm(out.hidden_states[k][0, -1]))
                if k == num_layers or logits.float().softmax(-1).max() > thresholds[i]:
                    seq.append(int(logits.argmax()))
                    depths.append(k)
                    break
    return seq[len(prompt) :], depths


@pytest.mark.parametrize("thresholds", [[0.3, 0.3], [0.2, 0.6]])
def test_dynamic_mixed_exits_match_cache_free_oracle(random_model, thresholds):
    runner = LayerRunner(random_model)
    mixed_seen = False
    for prompt in PROMPTS:
        result = dynamic_generate(runner, prompt, N, [2, 4, 6], thresholds)
        tokens, depths = _oracle_dynamic(random_model, prompt, N, [2, 4, 6], thresholds)
        assert result.token_ids == tokens
        assert result.stats["average_exit_depth"] == pytest.approx(sum(depths) / len(depths))
        if len(set(depths)) > 1 and result.stats["recomputed_positions"] > 0:
            mixed_seen = True
    assert mixed_seen, "thresholds must produce both early and deep tokens (lazy recompute path)"


def test_dynamic_bad_thresholds(random_model):
    with pytest.raises(ValueError, match="thresholds"):
        dynamic_generate(LayerRunner(random_model), PROMPTS[0], 3, [2, 4, 6], [0.1, 0.2, 0.3])
