"""The CPU compatibility layer (soft.compat.megatron_cpu): idempotent, refused where CUDA
works, fully undone by restore(), and invisible to other torch code afterwards."""

from __future__ import annotations

import pytest
import torch

from soft.compat import checkpoint_queue, megatron_cpu
from tests.megatron_env import single_rank_world


@pytest.fixture
def restored():
    """Run a test with the layer off, and leave it as the test process had it."""
    from megatron.core.tensor_parallel import random as mp_random

    single_rank_world()  # the rest of the session expects the layer applied
    tracker = mp_random._CUDA_RNG_STATE_TRACKER  # seeded by init_distributed
    megatron_cpu.restore()
    yield
    megatron_cpu.apply()
    # apply() installs a fresh tracker without the model-parallel RNG state: a later test that
    # builds a model in this process would fail with "rng state ... is not added".
    mp_random._CUDA_RNG_STATE_TRACKER = tracker


def _mode_stack() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


def test_apply_is_idempotent_and_restore_undoes_everything(restored):
    from megatron.core.tensor_parallel import random as mp_random

    originals = (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        mp_random._CUDA_RNG_STATE_TRACKER,
    )
    modes = _mode_stack()
    megatron_cpu.apply()
    megatron_cpu.apply()
    assert len(_mode_stack()) == len(modes) + 1  # entered once
    assert torch.zeros(2, device="cuda").device.type == "cpu"  # the patch at work
    assert torch.cuda.current_device() == torch.device("cpu")
    megatron_cpu.restore()
    megatron_cpu.restore()
    assert _mode_stack() == modes
    assert (
        torch.cuda.current_device,
        torch.cuda.synchronize,
        mp_random._CUDA_RNG_STATE_TRACKER,
    ) == originals
    with pytest.raises((RuntimeError, AssertionError)):  # plain torch again: no CUDA here
        torch.zeros(2, device="cuda")


def test_refused_where_cuda_works(restored, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="must not be applied on a machine with CUDA"):
        megatron_cpu.apply()
    assert not megatron_cpu.is_applied()


def test_a_gpu_machine_with_broken_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(megatron_cpu.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(RuntimeError, match="refusing to fall back to the CPU"):
        megatron_cpu.require_cpu_is_intended("auto")
    megatron_cpu.require_cpu_is_intended("gloo")  # asked for on purpose
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    megatron_cpu.require_cpu_is_intended("auto")


def test_transformers_in_the_same_process_is_unaffected_after_restore(restored):
    """A tiny LlamaForCausalLM gives the same logits before apply() and after restore(), and
    asking it for a CUDA device fails as plain torch does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    megatron_cpu.apply()
    megatron_cpu.restore()
    with torch.no_grad():
        after = model(tokens).logits
    assert torch.equal(before, after)
    with pytest.raises((RuntimeError, AssertionError)):
        model.to("cuda")


def test_the_checkpoint_queue_helper_is_restored():
    single_rank_world()
    checkpoint_queue.apply()
    checkpoint_queue.apply()
    assert checkpoint_queue.is_applied()
    checkpoint_queue.restore()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert not checkpoint_queue.is_applied() and filesystem_async._results_queue is None


def test_an_unknown_megatron_core_version_is_refused(monkeypatch):
    import megatron.core

    from soft.compat import versions

    versions.require_megatron.cache_clear()
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    try:
        with pytest.raises(RuntimeError, match="written for megatron-core 0.16.x"):
            versions.require_megatron()
    finally:
        versions.require_megatron.cache_clear()
