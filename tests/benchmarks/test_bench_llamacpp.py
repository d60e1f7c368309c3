"""An exit-k export in llama.cpp: llama.cpp's own converter turns it into GGUF, and llama.cpp's
greedy tokens equal transformers' on the same HF folder (fp32 GGUF: the same weights; the
tiny model's peaked logits leave no near-ties for kernel differences to flip).

Needs llama-cpp-python (built from source, ~14 min on 2 cores, so not installed by CI) and
llama.cpp's converter: `bash scripts/setup_llamacpp.sh`. Skipped without them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.benchmarks.bench_module import load_bench

bench = load_bench("bench_llamacpp")
CONVERTER = Path(os.environ.get("SOFT_LLAMACPP_CONVERTER", bench.default_converter()))
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or not CONVERTER.is_file(),
    reason="llama.cpp not installed (bash scripts/setup_llamacpp.sh)",
)


def test_exit_export_in_llamacpp_decodes_like_transformers(tmp_path, capsys):
    exports = bench.random_exports(tmp_path, layers=3, hidden=128, exits=[1], tokenizer=None)
    from soft.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(exports["exit1"] / "tokenizer.model")
    prompts = [tok.encode(p, bos=True) for p in bench.PROMPTS]
    llms = {}
    try:
        for name in ("exit1", "full"):
            gguf = bench.convert_to_gguf(CONVERTER, exports[name], tmp_path / f"{name}.gguf")
            llms[name] = llm = bench.open_gguf(gguf, n_ctx=128, threads=1)
            got = [bench.llamacpp_greedy(llm, p, 12, tok.eos_id) for p in prompts]
            assert got == bench.transformers_greedy(exports[name], prompts, 12, tok.eos_id), name
            assert all(len(t) > 1 for t in got)
        rates = bench.tokens_per_s(llms, prompts[:1], 4, rounds=1)
        assert rates.keys() == {"exit1", "full"} and min(rates.values()) > 0
    finally:
        for llm in llms.values():
            llm.close()
    # The whole benchmark on the same shapes: a table with both models.
    argv = ["--random-layers", "3", "--hidden", "128", "--exit-layers", "1",
            "--max-new-tokens", "8", "--rounds", "1", "--converter", str(CONVERTER),
            "--append-results", str(tmp_path / "RESULTS.md")]  # fmt: skip
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| exit1 | 1 |" in out and "| full | 3 |" in out and "4/4 |" in out
    assert "llama-cpp-python" in (tmp_path / "RESULTS.md").read_text()
