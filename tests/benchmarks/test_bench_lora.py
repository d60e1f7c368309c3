"""benchmarks/bench_lora.py end to end on a small model: both variants built, timed, counted."""

from __future__ import annotations

from tests.benchmarks.bench_module import load_bench


def test_bench_lora_counts_and_times_both_variants(tmp_path, capsys):
    bench = load_bench("bench_lora")
    results = tmp_path / "RESULTS.md"
    argv = ["--rank", "4", "--warmup", "0", "--steps", "2", "--append-results", str(results),
            "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
            "model.num_attention_heads=4", "data.seq_length=64", "data.builtin_num_samples=64"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = {r.split("|")[1].strip(): r for r in capsys.readouterr().out.splitlines()
            if r.startswith(("| full", "| lora"))}  # fmt: skip
    assert set(rows) == {"full", "lora"}

    def cells(name: str) -> list[str]:
        return [c.strip() for c in rows[name].split("|")[1:-1]]

    def mib(text: str) -> float:
        return float(text.removesuffix(" MiB").replace(",", ""))

    full, lora = cells("full"), cells("lora")
    trainable = {n: int(c[1].replace(",", "")) for n, c in (("full", full), ("lora", lora))}
    # rank 4 on 2 layers: A and B of four modules (in/out from the shapes above)
    per_layer = 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (128 + 64))
    assert trainable["lora"] == 2 * per_layer < trainable["full"]
    assert mib(lora[3]) < mib(full[3]) and mib(lora[4]) < mib(full[4])  # grads, optimizer
    assert mib(lora[5]) > 0 and float(lora[9].rstrip("x")) > 0
    assert "LoRA SoFT vs full SoFT" in results.read_text()
