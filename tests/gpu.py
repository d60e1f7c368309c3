"""What the GPU tests need (a CUDA GPU and Transformer Engine): their marks, in one place."""

from __future__ import annotations

import pytest
import torch

from soft.models.gpt import transformer_engine_available

HAVE_GPU_TE = torch.cuda.is_available() and transformer_engine_available()
GPU_TE_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not HAVE_GPU_TE, reason="needs Transformer Engine (scripts/gpu/install_on_gpu.sh)"
    ),
]
