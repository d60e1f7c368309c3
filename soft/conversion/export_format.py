"""The names of SoFT's additions to an exported HF folder, in one torch-free place: the
conversion writes them (soft.conversion.megatron_to_hf), evaluation and serving checks read
them (soft.evaluation.model_io, soft.conversion.serving).

config.json (beside transformers' own keys, which stay a plain LlamaConfig):
  soft_exit_layers        the exits the model was trained with (a sub-model: those <= k)
  soft_exit_weights       their loss weights
  soft_exit_mode          soft.mode of the training run (soft, sft, ict, extracted)
  soft_source_exit_layer  a sub-model export: the exit k it was cut at
  soft_source_num_layers  ... and the depth of the model it was cut from
  soft_exit_heads         ICT exports: the exits with their own head in exit_heads.safetensors
exit_heads.safetensors:   exit_heads.<k>.norm.weight [hidden], exit_heads.<k>.lm_head.weight
                          [vocab, hidden] per ICT exit k
A model imported from HF and exported again without SoFT training records none of them.
"""

from __future__ import annotations

EXIT_LAYERS_KEY = "soft_exit_layers"
EXIT_WEIGHTS_KEY = "soft_exit_weights"
EXIT_MODE_KEY = "soft_exit_mode"
SOURCE_EXIT_LAYER_KEY = "soft_source_exit_layer"
SOURCE_NUM_LAYERS_KEY = "soft_source_num_layers"
EXIT_HEADS_KEY = "soft_exit_heads"
EXIT_HEADS_FILE = "exit_heads.safetensors"


def exit_head_names(k: int) -> tuple[str, str]:
    """Tensor names of exit k's head in exit_heads.safetensors: (norm, lm_head)."""
    return f"exit_heads.{k}.norm.weight", f"exit_heads.{k}.lm_head.weight"
