"""This rank's model chunks: pipeline stages (or virtual chunks) of the LLaMA-2 GPTModel, each
exit-owning chunk with the heads its exits read through, initialised layout-invariantly.

Model code only: wrapping for data parallelism and precision, and keeping head copies in sync,
are applied from outside (soft.parallel.wrap, soft.parallel.head_sync).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig

from soft.models import heads
from soft.models.config import ModelConfig
from soft.models.exit_plan import ExitPlan
from soft.models.gpt import build_stage_model, layout_invariant_init


def _stage_flags(vp_stage: int | None) -> tuple[bool, bool]:
    ignore_virtual = vp_stage is None
    return (
        parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
        parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
    )


def build_chunks(
    model_cfg: ModelConfig,
    config: TransformerConfig,
    plan: ExitPlan,
    vocab_size: int,
    seed: int,
    init: bool = True,
) -> list[torch.nn.Module]:
    """GPTModel chunks for this rank (one per virtual pipeline stage), with exit heads, on the
    GPU when there is one; `init`: the layout-invariant random init (off when weights are
    loaded anyway). ict: everything but the separate heads is frozen."""
    vp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in [None] if vp is None else list(range(vp)):
        pre, post = _stage_flags(vp_stage)
        chunk = build_stage_model(model_cfg, config, vocab_size, pre, post, vp_stage)
        heads.add_exit_heads(
            chunk, plan, vocab_size, replica_index=(vp_stage or 0) * pp_size + pp_rank
        )
        chunks.append(chunk)
    if torch.cuda.is_available():
        chunks = [c.to(torch.device("cuda", torch.cuda.current_device())) for c in chunks]
    if init:
        layout_invariant_init(chunks, seed, model_cfg)
    if plan.separate_heads:  # before DDP, which only buckets parameters that train
        heads.freeze_all_but_separate_heads(chunks)
    return chunks
