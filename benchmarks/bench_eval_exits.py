"""eval_exits throughput: examples/s of the per-exit loss pass and of greedy generation, one
example at a time (batch 1: the previous code path, unchanged) against batched evaluation.

    python benchmarks/bench_eval_exits.py --data TRIVIAQA.jsonl --format triviaqa \\
        --tokenizer tokenizer.model [--model-dir HF_DIR] [--limit 64] [--batch-sizes 1,8,32]
        [--threads N]

Without --model-dir a random LLaMA-shaped model (--layers/--hidden, the tokenizer's
vocabulary) is evaluated: throughput depends on shapes, not on trained weights. Every batch
size must give the same losses and exact matches (checked here too).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.data.tokenizer import Tokenizer  # noqa: E402
from soft.evaluation import (  # noqa: E402
    evaluate_exits,
    load_eval_examples,
    load_exported_model,
    tokenize_example,
)


def random_export(out: Path, tokenizer: Path, layers: int, hidden: int) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = Tokenizer.from_file(tokenizer).vocab_size
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1024, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.model")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--format", default="triviaqa")
    parser.add_argument("--tokenizer", help="tokenizer.model for the random model")
    parser.add_argument("--model-dir", help="an exported HF folder instead of a random model")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            if args.tokenizer is None:
                parser.error("--tokenizer is needed for the random model")
            model_dir = random_export(
                Path(tmp) / "m", Path(args.tokenizer), args.layers, args.hidden
            )
        exported = load_exported_model(model_dir, device="cpu", dtype="float32")
        raw = load_eval_examples(args.data, args.format, args.limit)
        examples = [tokenize_example(exported.tokenizer, e) for e in raw]
        exits = sorted({max(1, exported.num_layers // 4), exported.num_layers // 2})
        print(f"{exported.num_layers} layers, hidden {exported.model.config.hidden_size}, vocab "
              f"{exported.model.config.vocab_size}; {len(examples)} examples; exits {exits} + full; "
              f"max_new_tokens {args.max_new_tokens}")  # fmt: skip
        print("| batch size | losses: examples/s | generation: examples/s | total: examples/s |")
        print("|---:|---:|---:|---:|")
        reference = None
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            common = dict(score_exact_match=True, stop_at_newline=True, progress=False)
            start = time.perf_counter()
            evaluate_exits(exported, examples, exits, 0, batch_size=bs, **common)
            losses_s = time.perf_counter() - start
            start = time.perf_counter()
            result = evaluate_exits(
                exported, examples, exits, args.max_new_tokens, batch_size=bs, **common
            )
            total_s = time.perf_counter() - start
            n = len(examples)
            gen_s = max(total_s - losses_s, 1e-9)
            print(f"| {bs} | {n / losses_s:.1f} | {n / gen_s:.1f} | {n / total_s:.1f} |")
            summary = [(r.layer, round(r.loss, 4), r.exact_match, r.generated_tokens)
                       for r in result.records]  # fmt: skip
            if reference is None:
                reference = summary
            elif summary != reference:
                print(f"MISMATCH at batch size {bs}: {summary} vs {reference}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
