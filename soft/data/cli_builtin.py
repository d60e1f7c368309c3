"""Regenerate soft/data/assets/builtin_tokenizer.model from the built-in task generator, or
write a held-out split of the built-in tasks as an Alpaca JSON file for evaluation, or the
tasks as multi-turn chat records, or a small Hugging Face tokenizer with a chat template.

    soft-make-builtin-data [--out PATH]          # the tokenizer (commit the result)
    soft-make-builtin-data --test-records FILE [--count N] [--seed S] [--train-count M]
    soft-make-builtin-data --messages FILE.jsonl [--count N] [--turns T] [--split S]
    soft-make-builtin-data --hf-tokenizer DIR [--chat-style chatml|llama3]

The test split excludes every question of a training run that used the built-in tasks with
`train.seed=S` and `data.builtin_num_samples=M` (the defaults match the default job).
`--messages` writes {"messages": [...]} records of T tasks each (data.format=messages); the
`test` split is drawn from another stream than `train` (the tasks' domains are large, but not
every question is excluded). `--hf-tokenizer` writes a byte-level BPE trained on the tasks as
tokenizer.json + tokenizer_config.json + chat_template.jinja in the ChatML (Qwen) or LLaMA-3
convention: an offline stand-in for a chat model's tokenizer. `python tools/make_builtin_data.py`
runs the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from soft.data.builtin import (
    BUILTIN_TOKENIZER_PATH,
    CHAT_STYLES,
    generate_conversations,
    generate_records,
    record_key,
    train_builtin_tokenizer,
    train_hf_tokenizer,
)
from soft.data.tokenizer import Tokenizer


def write_test_records(path: Path, count: int, seed: int, train_count: int) -> None:
    train = generate_records(seed, train_count)
    exclude = {record_key(r) for r in train}
    records = generate_records(seed, count, split="test", exclude=exclude)
    path.write_text(json.dumps(records, indent=1))
    print(
        f"wrote {path}: {len(records)} held-out records (none of the {train_count} training ones)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_TOKENIZER_PATH, help="output .model")
    parser.add_argument(
        "--test-records", type=Path, help="write a held-out Alpaca JSON file instead"
    )
    parser.add_argument(
        "--messages", type=Path, help="write multi-turn chat records (JSON Lines) instead"
    )
    parser.add_argument("--turns", type=int, default=2, help="--messages: tasks per conversation")
    parser.add_argument("--split", default="train", help="--messages: train, test, ...")
    parser.add_argument(
        "--hf-tokenizer", type=Path, help="write a Hugging Face tokenizer folder instead"
    )
    parser.add_argument("--chat-style", default="chatml", choices=CHAT_STYLES)
    parser.add_argument("--count", type=int, default=200, help="records to write")
    parser.add_argument("--seed", type=int, default=42, help="the training run's train.seed")
    parser.add_argument(
        "--train-count", type=int, default=2000, help="the training run's data.builtin_num_samples"
    )
    args = parser.parse_args(argv)
    if args.test_records is not None:
        write_test_records(args.test_records, args.count, args.seed, args.train_count)
        return 0
    if args.messages is not None:
        records = generate_conversations(args.seed, args.count, turns=args.turns, split=args.split)
        args.messages.parent.mkdir(parents=True, exist_ok=True)
        args.messages.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {args.messages}: {len(records)} conversations of {args.turns} tasks")
        return 0
    if args.hf_tokenizer is not None:
        folder = train_hf_tokenizer(args.hf_tokenizer, args.chat_style)
        tok = Tokenizer.from_file(folder)
        print(f"wrote {folder} ({args.chat_style} chat template, {tok.vocab_size} tokens)")
        return 0
    path = train_builtin_tokenizer(args.out)
    tok = Tokenizer.from_file(path)
    sample = generate_records(0, 1)[0]
    print(f"wrote {path} ({path.stat().st_size} bytes, {tok.vocab_size} pieces)")
    print(f"example: {sample['output']!r} -> {tok.encode(sample['output'])}")
    return 0


if __name__ == "__main__":  # python -m soft.data.cli_builtin
    raise SystemExit(main())
