"""Regenerate soft/data/assets/builtin_tokenizer.model from the built-in task generator.

Run once after changing soft/data/builtin.py's tasks or tokenizer settings, and commit the
result: `python tools/make_builtin_data.py [--out PATH]`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soft.data.builtin import (  # noqa: E402
    BUILTIN_TOKENIZER_PATH,
    generate_records,
    train_builtin_tokenizer,
)
from soft.data.tokenizer import Tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_TOKENIZER_PATH, help="output .model")
    args = parser.parse_args(argv)
    path = train_builtin_tokenizer(args.out)
    tok = Tokenizer.from_file(path)
    sample = generate_records(0, 1)[0]
    print(f"wrote {path} ({path.stat().st_size} bytes, {tok.vocab_size} pieces)")
    print(f"example: {sample['output']!r} -> {tok.encode(sample['output'])}")


if __name__ == "__main__":
    main()
