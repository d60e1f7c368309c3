"""Parallelism section of the config: all layout choices are fields here, never model patches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from soft.config.core import option
from soft.config.errors import ConfigError


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = option(1, "Tensor-parallel size (splits heads and FFN).")
    pipeline_model_parallel_size: int = option(1, "Pipeline-parallel stages.")
    virtual_pipeline_model_parallel_size: int | None = option(
        None, "Model chunks per pipeline rank (interleaved 1F1B); null = plain 1F1B."
    )
    num_layers_in_first_pipeline_stage: int | None = option(
        None, "Uneven pipeline: layers on the first stage (the rest split evenly)."
    )
    num_layers_in_last_pipeline_stage: int | None = option(
        None, "Uneven pipeline: layers on the last stage (it also holds the LM head and the loss)."
    )
    sequence_parallel: bool = option(
        False,
        "Sequence parallelism: norms and residuals hold s/TP positions per rank (needs TP > 1).",
    )
    use_distributed_optimizer: bool = option(
        False, "Shard optimizer state over data-parallel ranks (ZeRO-1)."
    )
    overlap_grad_reduce: bool = option(
        False, "Overlap the data-parallel grad reduce with backward (GPU)."
    )
    overlap_param_gather: bool = option(
        False, "Overlap the distributed optimizer's param all-gather with forward (GPU)."
    )
    backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", "torch.distributed backend: auto = nccl on GPUs, gloo on CPU."
    )

    def transformer_fields(self) -> dict[str, Any]:
        """The layout's TransformerConfig fields (the model's are soft.models.gpt.model_fields;
        soft.training.model.transformer_config composes the two)."""
        import torch  # here, not at the top: loading a config imports no torch

        return dict(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            num_layers_in_first_pipeline_stage=self.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=self.num_layers_in_last_pipeline_stage,
            sequence_parallel=self.sequence_parallel,
            deallocate_pipeline_outputs=True,
            # gloo matches point-to-point messages by (source, tag). With PP=2 interleaving a
            # rank's previous and next stage are the same rank, and megatron's batched ops post
            # two same-tag receives from it at once, so a forward activation and a backward
            # gradient can swap. The unbatched path posts in a rank-parity order that pairs
            # them correctly.
            batch_p2p_comm=torch.cuda.is_available(),
        )

    def validate(self, prefix: str = "parallel") -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}.{name}': expected >= 1")
        vp = self.virtual_pipeline_model_parallel_size
        if vp is not None and (vp < 2 or self.pipeline_model_parallel_size < 2):
            raise ConfigError(
                f"config key '{prefix}.virtual_pipeline_model_parallel_size': expected >= 2 with "
                f"pipeline_model_parallel_size >= 2 (or null), got {vp}"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ConfigError(
                f"config key '{prefix}.sequence_parallel' needs tensor_model_parallel_size > 1"
            )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError(
                f"config key '{prefix}.overlap_param_gather' needs use_distributed_optimizer"
            )
        uneven = (self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage)
        if any(n is not None for n in uneven):
            if self.pipeline_model_parallel_size < 2:
                raise ConfigError(
                    f"config key '{prefix}.num_layers_in_first/last_pipeline_stage' needs PP > 1"
                )
            if vp is not None:
                raise ConfigError(
                    f"uneven pipeline stages with '{prefix}.virtual_pipeline_model_parallel_size' are not supported"
                )
            for n in uneven:
                if n is not None and n < 1:
                    raise ConfigError(
                        f"config key '{prefix}.num_layers_in_*_pipeline_stage': expected >= 1"
                    )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def stage_layer_counts(self, num_layers: int) -> list[int]:
        """Layers per pipeline stage (before virtual chunking), as megatron-core will assign them."""
        pp = self.pipeline_model_parallel_size
        first, last = (
            self.num_layers_in_first_pipeline_stage,
            self.num_layers_in_last_pipeline_stage,
        )
        middle_stages = pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        if middle_stages == 0:
            if rest != 0:
                raise ConfigError(
                    f"pipeline stage layer counts {first}+{last} != model.num_layers={num_layers}"
                )
            return [first, last]  # type: ignore[list-item]
        if rest < middle_stages or rest % middle_stages:
            raise ConfigError(
                f"model.num_layers={num_layers} cannot be split over {pp} pipeline stages "
                f"(first={first}, last={last}): {rest} layers left for {middle_stages} stage(s)"
            )
        counts = [rest // middle_stages] * middle_stages
        if first is not None:
            counts.insert(0, first)
        if last is not None:
            counts.append(last)
        return counts
