"""Run megatron-core 0.16.1 on CPU (tests, the embedded default job). Every patch lives here.

megatron-core assumes CUDA in a number of places on the training path (see
the call sites below). Rather than editing those call sites one by one,
two mechanisms cover them:

1. `_CudaToCpuMode`, a `TorchFunctionMode` entered by apply() and left by restore(). It rewrites torch
   calls that name a CUDA device so they use the CPU:
   - factory calls with `device="cuda"` / a CUDA `torch.device` / an int device:
     `pipeline_parallel/schedules.py:596,983,2138` (`total_num_tokens` zeros),
     `optimizer/optimizer.py:473,481,485,907`, `optimizer/clip_grads.py:90,103,115,174,207`,
     `utils.py:631,1207`, `distributed/param_and_grad_buffer.py:768,783,800,806`,
     `pipeline_parallel/p2p_communication.py:190-202,313,321`,
     `models/common/embeddings/rotary_pos_embedding.py:162,297`;
   - `Tensor.to("cuda")` / `Tensor.cuda()`: `optimizer/distrib_optimizer.py:1089`, `utils.py:898`;
   - `Tensor.type()` with no argument reports the CUDA type name for CPU tensors, because
     megatron compares it with `'torch.cuda.FloatTensor'` to classify parameters:
     `optimizer/clip_grads.py:167`, `optimizer/optimizer.py:671,690`,
     `optimizer/distrib_optimizer.py:361,420,582`.
2. Small replacements on `torch.cuda` for functions megatron calls directly and that raise on
   a CPU-only build: `current_device` (returns the CPU device, so `device=current_device()`
   works), `synchronize` (`p2p_communication.py:242,398`; nothing to wait for on CPU).
3. A CPU RNG tracker in place of `CudaRNGStatesTracker` (`tensor_parallel/random.py:161`),
   whose `add`/`fork` read and write `torch.cuda` generator states. Ours keeps CPU generator
   states under the same names, so `get_cuda_rng_tracker().fork()` (attention dropout,
   weight init helpers) and checkpointed RNG states work.
4. `_get_cuda_rng_state` / `_set_cuda_rng_state` (`tensor_parallel/random.py:41,73`), which
   activation recompute's `CheckpointFunction` calls to save and restore the device generator
   around the rerun (`random.py:447-451`): on CPU the device generator is the CPU one.

Known limits (validated in config, not patched): the default causal mask in
`transformer/dot_product_attention.py` is built on CUDA, so callers pass an explicit mask;
gradient-reduce overlap uses CUDA streams and stays off on CPU; fused kernels stay off.

`apply()` is idempotent, checks the megatron-core version the patches were written for, and
refuses to run when CUDA is available: a GPU run never sees any of this (and a GPU machine
whose CUDA fails to initialise is an error, `require_cpu_is_intended`). `restore()` undoes
everything; `soft.parallel.setup.destroy_distributed` calls it at the end of a job.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from soft.compat.versions import require_megatron

if TYPE_CHECKING:  # megatron is imported by apply() only
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

_APPLIED = False
_MODE: TorchFunctionMode | None = None
_SAVED: dict[str, Any] = {}
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch.cuda.current_device() names a GPU.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU (patch 1 in the module docstring)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def _make_cpu_rng_tracker() -> type[CudaRNGStatesTracker]:
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Same interface as megatron's tracker; the named states are CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _cpu_device() -> torch.device:
    return _CPU


def apply() -> None:
    """Install the CPU patches (idempotent; an error when CUDA is available)."""
    global _APPLIED, _MODE, _SAVED
    if _APPLIED:
        return
    require_megatron()
    if torch.cuda.is_available():
        raise RuntimeError("soft.compat.megatron_cpu must not be applied on a machine with CUDA")
    from megatron.core.tensor_parallel import random as mp_random

    _SAVED = {
        "current_device": torch.cuda.current_device,
        "synchronize": torch.cuda.synchronize,
        "tracker": mp_random._CUDA_RNG_STATE_TRACKER,
        "tracker_initialized": mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "get_rng_state": mp_random._get_cuda_rng_state,
        "set_rng_state": mp_random._set_cuda_rng_state,
    }
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # until restore(): every torch call of this process goes through it

    # torch declares an int index; megatron only passes the result on as a device, so the CPU
    # device itself is what it must get here.
    torch.cuda.current_device = _cpu_device  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None
    # megatron declares the global as a bare `= None`, so its inferred type is None.
    mp_random._CUDA_RNG_STATE_TRACKER = _make_cpu_rng_tracker()()  # type: ignore[assignment]
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _APPLIED = True


def restore() -> None:
    """Undo apply(): leave the torch-function mode, put torch.cuda's functions and megatron's
    RNG tracker back. Idempotent. Called by soft.parallel.setup.destroy_distributed, so code
    that runs after a job in the same process (transformers, evaluation) sees plain torch."""
    global _APPLIED, _MODE, _SAVED
    if not _APPLIED:
        return
    from megatron.core.tensor_parallel import random as mp_random

    if _MODE is not None:
        _MODE.__exit__(None, None, None)
    torch.cuda.current_device = _SAVED["current_device"]
    torch.cuda.synchronize = _SAVED["synchronize"]
    mp_random._CUDA_RNG_STATE_TRACKER = _SAVED["tracker"]
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = _SAVED["tracker_initialized"]
    mp_random._get_cuda_rng_state = _SAVED["get_rng_state"]
    mp_random._set_cuda_rng_state = _SAVED["set_rng_state"]
    _MODE, _SAVED, _APPLIED = None, {}, False


def is_applied() -> bool:
    return _APPLIED


def require_cpu_is_intended(backend: str) -> None:
    """No CUDA here: fine on a CPU machine, or when the gloo backend was asked for. On a machine
    with NVIDIA devices whose CUDA failed to initialise (a driver mismatch, a CPU-only torch
    build), a GPU job must fail, not run on the CPU shims hours slower."""
    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1")
    if not devices or hidden or backend == "gloo":
        return
    raise RuntimeError(
        f"NVIDIA devices are present ({', '.join(devices)}) but CUDA is not usable (torch "
        f"{torch.__version__}, built for CUDA {torch.version.cuda}): refusing to fall back to the "
        "CPU. Fix the driver or the torch build, or set parallel.backend=gloo (or "
        "CUDA_VISIBLE_DEVICES=) to run on the CPU on purpose"
    )


def seed_rng_tracker(seed: int, tp_rank: int) -> None:
    """CPU counterpart of `model_parallel_cuda_manual_seed`: same names and seed offsets."""
    from megatron.core.tensor_parallel import random as mp_random

    tracker = mp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
