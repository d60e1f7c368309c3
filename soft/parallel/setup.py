"""Process groups: torch.distributed + megatron-core parallel state, on GPUs or CPU (gloo)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from soft.config.errors import ConfigError
from soft.parallel.config import ParallelConfig


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig, seed: int) -> Topology:
    """Start torch.distributed (from torchrun's env, or a 1-process group) and megatron groups."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        from soft.compat import megatron_cpu

        megatron_cpu.require_cpu_is_intended(parallel.backend)
        megatron_cpu.apply()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise ConfigError("config key 'parallel.backend' is 'nccl' but no CUDA GPU is present")
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / srun: rendezvous from the environment
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        else:  # plain `python launcher.py`: a world of one (the environment is left untouched)
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timedelta(minutes=30),
            )
    world = dist.get_world_size()
    if world % parallel.model_parallel_size:
        raise ConfigError(
            f"world size {world} is not divisible by tensor x pipeline parallel size "
            f"{parallel.tensor_model_parallel_size} x {parallel.pipeline_model_parallel_size}"
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            get_embedding_ranks=embedding_ranks,
        )
    seed_everything(seed)
    return current_topology()


def embedding_ranks(pp_ranks: list[int], split_rank: int | None = None) -> list[int]:
    """megatron-core's word-embedding group: the first pipeline stage only (its default adds
    the last stage). With tied embeddings the LM head is the embedding matrix, and besides the
    first and last stage every stage with an early exit holds a copy; one owner sums all their
    gradients, soft.parallel.head_sync. A one-rank group turns megatron-core's own first+last
    sum off (finalize_model_grads.py `_allreduce_word_embedding_grads` skips groups of size 1),
    so no copy's gradient is counted twice; untied models never use the group."""
    return [pp_ranks[0]]


def current_topology() -> Topology:
    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu"),
    )


def seed_everything(seed: int) -> None:
    """Same seeds as megatron's `model_parallel_cuda_manual_seed` (dropout, TP-local RNG)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        from soft.compat.megatron_cpu import seed_rng_tracker

        seed_rng_tracker(seed, tp_rank)


def destroy_distributed() -> None:
    """End of a job: process groups, and the helper processes started for checkpoints."""
    from soft.compat import checkpoint_queue, megatron_cpu

    checkpoint_queue.restore()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    megatron_cpu.restore()
