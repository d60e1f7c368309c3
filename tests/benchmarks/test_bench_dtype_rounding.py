"""benchmarks/bench_dtype_rounding.py on a tiny model: the bf16 rounding of fp16 weights is
bounded by bf16's half unit in the last place (2^-8 relative) and moves the logits a little."""

from __future__ import annotations

from tests.benchmarks.bench_module import load_bench


def test_rounding_error_is_bf16_half_ulp_and_logits_move(capsys):
    bench = load_bench("bench_dtype_rounding")
    w = bench.weight_error(n=100_000)
    assert 2**-9 < w["max_rel"] <= 2**-8 and 0 < w["mean_rel"] < w["max_rel"]
    m = bench.logits_change(layers=1, hidden=64, vocab=128)
    assert m["max_abs_logit_diff"] > 0 and m["rel_logit_diff"] < 0.05
    bench.main(["--layers", "1", "--hidden", "64", "--vocab", "128"])
    assert "relative rounding error max 0.3" in capsys.readouterr().out
