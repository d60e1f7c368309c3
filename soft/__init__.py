"""soft: Sorted Fine-Tuning (SoFT) of LLaMA-2 models on megatron-core."""

import warnings

# megatron-core warns at import, once per module, that it falls back to torch kernels when
# neither Apex nor Transformer Engine is installed: the expected state on CPU machines.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
