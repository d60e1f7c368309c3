"""benchmarks/bench_soft_vs_sft.py end to end on the tiny model: 1 warm-up + 1 timed step per mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_soft_vs_sft.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_soft_vs_sft", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_prints_both_modes_and_ratios(tmp_path, capsys):
    bench = _load_bench()
    results = tmp_path / "RESULTS.md"
    argv = ["--warmup", "1", "--steps", "1", "--append-results", str(results), "train.global_batch_size=4",
            "train.micro_batch_size=2", "data.seq_length=64"]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| mode | precision | step time")
    assert any(r.startswith("| sft | fp32 |") for r in rows)
    assert any(r.startswith("| soft | fp32 |") for r in rows)
    ratio = next(r for r in rows if r.startswith("| SoFT/SFT | fp32 |"))
    assert "(predicted)" in ratio and ratio.count("x |") >= 3
    appended = results.read_text()
    assert "device: CPU" in appended and "megatron-core 0.16.1" in appended
    assert "| SoFT/SFT |" in appended and "--append-results" in appended


def test_fp8_flag_without_gpu_skips_fp8_rows(capsys):
    bench = _load_bench()
    args = bench.parse_args(["--fp8"])
    notes = []
    plans = bench.plans(args, notes.append)
    if bench.torch.cuda.is_available() and bench.transformer_engine_available():
        assert len(plans) == 4
    else:
        assert [p[-1] for p in plans] == ["soft.mode=sft", "soft.mode=soft"]
        assert "FP8 rows skipped" in notes[0]
