"""benchmarks/bench_packing.py end to end on the built-in tasks: the count, one timed round."""

from __future__ import annotations

from tests.benchmarks.bench_module import load_bench


def test_bench_packing_counts_and_times_both_variants(tmp_path, capsys, monkeypatch):
    bench = load_bench("bench_packing")
    monkeypatch.setattr(bench, "SHARED", tmp_path / "none")  # the built-in tasks only
    monkeypatch.setattr(bench, "LLAMA2", tmp_path / "none" / "tokenizer.model")
    results = tmp_path / "RESULTS.md"
    argv = ["--seq", "128", "--warmup", "0", "--steps", "2", "--append-results", str(results),
            "data.builtin_num_samples=200", "train.global_batch_size=4", "train.micro_batch_size=2"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    count = [r for r in rows if r.startswith("| built-in tasks | 128 |")]
    assert len(count) == 1
    cells = [c.strip() for c in count[0].split("|")[1:-1]]
    padded, packed = float(cells[3].rstrip("%")), float(cells[4].rstrip("%"))
    assert 0 <= packed < padded < 100
    speed = {r.split("|")[2].strip(): r for r in rows if r.startswith("| 128 |")}
    assert set(speed) == {"padded", "packed"}
    # Same-shaped steps, more examples in each: more response tokens per step (a count; the
    # timings of two rounds on a shared CPU are too noisy to assert on, only that they exist).
    per_step = {n: float(r.split("|")[5]) for n, r in speed.items()}
    assert per_step["packed"] > 1.3 * per_step["padded"] > 0
    assert float(speed["packed"].split("|")[8].strip().rstrip("x")) > 0
    assert "data.packing: padding and speed" in results.read_text()
