"""HF <-> megatron-core checkpoint conversion for the LLaMA-architecture families (LLaMA-2/3,
Mistral, Qwen2/2.5, Qwen3; declarative tables in `mapping`).

Public API: `convert_hf_to_megatron`, `convert_megatron_to_hf` + `ExportRequest`. They are
imported on first use, so that the torch-free `soft.conversion.export_format` (read by the
evaluation side) does not pull megatron-core in.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportRequest", "convert_hf_to_megatron", "convert_megatron_to_hf"]


def __getattr__(name: str) -> Any:  # the lazily imported functions and class
    if name == "convert_hf_to_megatron":
        from soft.conversion.hf_to_megatron import convert_hf_to_megatron

        return convert_hf_to_megatron
    if name in ("ExportRequest", "convert_megatron_to_hf"):
        from soft.conversion import megatron_to_hf

        return getattr(megatron_to_hf, name)
    raise AttributeError(f"module 'soft.conversion' has no attribute {name!r}")
