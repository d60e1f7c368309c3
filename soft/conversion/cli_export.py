"""Export a SoFT megatron-core checkpoint as a Hugging Face folder of its family
(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM).

    soft-export --checkpoint-dir RUN/checkpoints --out-dir HF_OUT
        [--exit-layer K] [--dtype auto|fp32|bf16|fp16]
    (or: python tools/convert_megatron_to_hf.py ...)

--checkpoint-dir is a run's checkpoints folder (its `latest` is used) or one iter_* folder,
saved at any TP/PP layout. --exit-layer K writes the standalone sub-model: the first K layers
with the model's shared final norm and LM head.

A LoRA run's checkpoint (peft.method=lora) is exported merged into the base checkpoint it
names (checked by checksum), with no extra flag. --peft-adapter writes its adapters as a PEFT
adapter folder instead (adapter_config.json + adapter_model.safetensors), to load with
peft.PeftModel.from_pretrained over the base's own export (with --exit-layer K: over the
base's K-layer export).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from soft.config.errors import InputError
from soft.conversion.megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, ExportRequest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint-dir", required=True, help="checkpoints folder (uses latest) or iter_* folder"
    )
    parser.add_argument(
        "--out-dir", required=True, help="output folder (must not exist unless --overwrite)"
    )
    parser.add_argument(
        "--exit-layer", type=int, default=None, help="export the sub-model of the first K layers"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto = as stored"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="the tokenizer, in any form data.tokenizer_path takes (default: the run's)",
    )
    parser.add_argument(
        "--peft-adapter",
        action="store_true",
        help="a LoRA run: write a PEFT adapter folder instead of the merged model",
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help="--peft-adapter: base_model_name_or_path to record (the base's HF export or hub name)",
    )
    parser.add_argument("--max-shard-size-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**20)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow-unverified",
        action="store_true",
        help="export a checkpoint that has no manifest.json (written before checksums existed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    from soft.conversion.megatron_to_hf import convert_megatron_to_hf

    request = ExportRequest(
        checkpoint_dir=Path(args.checkpoint_dir),
        out_dir=Path(args.out_dir),
        exit_layer=args.exit_layer,
        dtype=args.dtype,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None,
        max_shard_bytes=int(args.max_shard_size_mb * 2**20),
        overwrite=args.overwrite,
        progress=not args.no_progress,
        allow_unverified=args.allow_unverified,
        peft_adapter=args.peft_adapter,
        base_model=args.base_model,
    )
    try:
        out = convert_megatron_to_hf(request)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # python -m soft.conversion.cli_export
    raise SystemExit(main())
