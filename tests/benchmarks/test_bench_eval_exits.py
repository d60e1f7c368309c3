"""benchmarks/bench_eval_exits.py on a tiny random model: the table, and the same losses,
exact matches and generated token counts at every batch size (it exits 1 otherwise)."""

from __future__ import annotations

import json

from soft.data.builtin import BUILTIN_TOKENIZER_PATH
from tests.benchmarks.bench_module import load_bench


def test_bench_prints_examples_per_second_for_each_batch_size(tmp_path, capsys):
    bench = load_bench("bench_eval_exits")
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus {i}?", "answer": [str(2 * i)]} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--data", str(data), "--tokenizer", str(BUILTIN_TOKENIZER_PATH), "--layers", "4",
            "--hidden", "64", "--limit", "10", "--max-new-tokens", "4", "--batch-sizes", "1,4"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| batch size | losses: examples/s |" in out
    assert "\n| 1 | " in out and "\n| 4 | " in out and "MISMATCH" not in out
