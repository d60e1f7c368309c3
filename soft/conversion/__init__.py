"""HF LLaMA-2 <-> megatron-core checkpoint conversion (declarative table in `mapping`).

Public API: `convert_hf_to_megatron`, `convert_megatron_to_hf` + `ExportRequest`.
"""

from soft.conversion.hf_to_megatron import convert_hf_to_megatron
from soft.conversion.megatron_to_hf import ExportRequest, convert_megatron_to_hf

__all__ = ["ExportRequest", "convert_hf_to_megatron", "convert_megatron_to_hf"]
