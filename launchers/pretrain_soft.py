"""Train a LLaMA-2-shaped megatron-core model with Sorted Fine-Tuning (SoFT).

    torchrun --nproc-per-node N launchers/pretrain_soft.py [--config FILE] [key=value ...]

With no --config, the embedded default runs: a tiny model on the project's built-in
instruction tasks and tokenizer (no files needed). Overrides are dotted config keys, e.g.
`soft.exit_layers=[2,4] train.train_iters=50`; see README.md for the reference.
"""

import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
