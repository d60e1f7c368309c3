"""benchmarks/bench_soft_vs_sft.py end to end on the tiny model: 1 warm-up + 2 timed rounds."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.bench_module import load_bench


def test_bench_prints_every_variant_side_by_side(tmp_path, capsys):
    bench = load_bench("bench_soft_vs_sft")
    results = tmp_path / "RESULTS.md"
    argv = ["--warmup", "1", "--steps", "2", "--append-results", str(results),
            "train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_length=64"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | precision | step time")
    names = [r.split("|")[1].strip() for r in rows[2:]]
    assert names == [
        "sft", "sft+idle-exits", "sft+logged-exits", "soft-fused", "soft-recompute", "soft-plain",
    ]  # fmt: skip
    cells = {
        n: [c.strip() for c in r.split("|")[1:-1]] for n, r in zip(names, rows[2:], strict=True)
    }
    assert cells["sft"][3:6] == ["1.000x", "1.000x", "1.000x"]  # the baseline against itself
    # predicted FLOPs: idle exits add none, logged exits 3 forward heads, SoFT 3 trained heads
    assert cells["sft+idle-exits"][5] == "1.000x"
    assert (
        float(cells["soft-fused"][5].rstrip("x"))
        > float(cells["sft+logged-exits"][5].rstrip("x"))
        > 1
    )
    assert all(float(c[9]) > 0 for c in cells.values())  # every step-memory peak measured
    appended = results.read_text()
    assert "device: CPU" in appended and "megatron-core 0.16.1" in appended
    assert "| soft-fused |" in appended and "--append-results" in appended


def test_unknown_variant_is_a_clear_error(capsys):
    bench = load_bench("bench_soft_vs_sft")
    assert bench.main(["--variants", "soft-magic", "--steps", "1"]) == 2
    assert "unknown ['soft-magic']" in capsys.readouterr().err


def test_fp8_flag_without_gpu_skips_fp8_rows():
    bench = load_bench("bench_soft_vs_sft")
    if bench.torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    notes = []
    args = bench.parse_args(["--fp8", "--variants", "soft-fused", "--warmup", "0", "--steps", "1"])
    results = bench.measure_all(args, bench.choose(args, 4), notes.append)
    assert "FP8 rows skipped" in "".join(notes)
    assert [m.variant.name for m in results] == ["sft", "soft-fused"]


def test_cpu_step_peak_counts_what_the_step_allocates_above_its_start():
    """Against allocations whose sizes are known: a tensor kept (1 MiB) and a temporary
    (4 MiB) peak at 5 MiB. A tensor made before the step and freed in it (8 MiB) would lower
    torch.cuda.memory_allocated; the CPU profiler cannot size a block allocated before it
    started, so the CPU measure does not see that free and stays at 5 MiB (an upper bound)."""
    bench = load_bench("bench_soft_vs_sft")
    mib = 2**20
    kept = []

    def step():
        kept.append(torch.empty(mib, dtype=torch.uint8))
        temporary = torch.empty(4 * mib, dtype=torch.uint8)
        del temporary

    assert bench.cpu_step_peak_bytes(step) == 5 * mib
    made_before = [torch.empty(8 * mib, dtype=torch.uint8)]

    def step_that_frees_first():
        made_before.clear()
        step()

    assert bench.cpu_step_peak_bytes(step_that_frees_first) == 5 * mib
