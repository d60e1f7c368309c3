"""Convert a Hugging Face folder (LLaMA-2/3, Mistral, Qwen2/2.5, Qwen3) into a megatron-core
checkpoint for SoFT fine-tuning.

    soft-convert-hf --hf-dir HF_DIR --out-dir OUT [--dtype auto]
    (or: python tools/convert_hf_to_megatron.py ...)

Then train from it at any TP/PP/DP layout:

    torchrun ... launchers/pretrain_soft.py --config OUT/model.yaml \\
        checkpoint.load_dir=OUT checkpoint.finetune=true ...

(or put `defaults: [OUT/model.yaml]` at the top of your own config).
"""

from __future__ import annotations

import argparse
import logging
import sys

from soft.config.errors import InputError
from soft.conversion.vocab import DEFAULT_MAX_TP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf-dir", required=True, help="HF folder: config.json + safetensors/.bin weights"
    )
    parser.add_argument(
        "--out-dir", required=True, help="output folder (must not exist unless --overwrite)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
        help="stored dtype and model.yaml's params_dtype; auto (default) = the dtype the HF "
        "tensors are stored in (LLaMA-2: fp16), so nothing is rounded",
    )  # fmt: skip
    parser.add_argument(
        "--max-tensor-parallel", type=int, default=DEFAULT_MAX_TP,
        help="the checkpoint loads at every TP size dividing this (vocabulary padding)",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from soft.conversion.hf_to_megatron import convert_hf_to_megatron

    try:
        out = convert_hf_to_megatron(
            args.hf_dir,
            args.out_dir,
            args.dtype,
            args.max_tensor_parallel,
            args.overwrite,
            not args.no_progress,
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out}; train with --config {out / 'model.yaml'} checkpoint.load_dir={out} checkpoint.finetune=true"
    )
    return 0


if __name__ == "__main__":  # python -m soft.conversion.cli_import
    raise SystemExit(main())
