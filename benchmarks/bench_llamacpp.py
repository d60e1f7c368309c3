"""Exit-k exports in llama.cpp: GGUF conversion with llama.cpp's own converter, greedy tokens
checked against transformers, and decoding speed of each sub-model against the full model.

    bash scripts/setup_llamacpp.sh          # llama-cpp-python (built from source) + the converter
    python benchmarks/bench_llamacpp.py --full HF_FULL --exit HF_EXIT8 --exit HF_EXIT16
    python benchmarks/bench_llamacpp.py --random-layers 16 --hidden 1024 --exit-layers 4,8
        [--outtype f32|f16|q8_0] [--threads 2] [--max-new-tokens 64] [--append-results RESULTS.md]

`--full/--exit` take HF folders written by tools/convert_megatron_to_hf.py (with and without
`--exit-layer k`). `--random-layers` makes them: a random LLaMA-shaped model (LLaMA-2's
tokenizer when --tokenizer is given) imported to megatron and exported back, full and at each
exit, by the project's own converters; speed depends on shapes, not on trained weights.

Every export is converted to GGUF by `convert_hf_to_gguf.py` (llama.cpp's, from the
llama-cpp-python source distribution: scripts/setup_llamacpp.sh puts it in
.venv/share/llama.cpp), decoded greedily by llama.cpp (llama-cpp-python, temp 0 = argmax) on
fixed prompts, and compared token by token with transformers' greedy `generate` on the same
HF folder (up to EOS). Tokens/s: `--max-new-tokens` decoded tokens (EOS ignored, the same
work for every model) / wall time of llama.cpp's prompt + decode, one prompt at a time, the
models interleaved prompt by prompt (load drift on a shared machine hits all alike), median
over `--rounds` passes of the prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Answer the following question.\nQuestion: Who wrote the novel Babbitt?\nAnswer:",
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName three primary colors.\n\n### Response:\n",
    "The capital of France is",
    "def fibonacci(n):",
]


def default_converter() -> Path:
    """Where scripts/setup_llamacpp.sh puts llama.cpp's converter."""
    return Path(sys.prefix) / "share" / "llama.cpp" / "convert_hf_to_gguf.py"


def convert_to_gguf(converter: Path, hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own HF -> GGUF converter, run as its authors document it."""
    if not converter.is_file():
        raise FileNotFoundError(
            f"llama.cpp converter {converter} not found: run scripts/setup_llamacpp.sh or pass "
            "--converter PATH/convert_hf_to_gguf.py"
        )
    cmd = [sys.executable, str(converter), str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


def open_gguf(gguf: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def llamacpp_greedy(llm, prompt: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """llama.cpp's greedy continuation (temp 0 = argmax), up to and including `eos`."""
    tokens: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        tokens.append(int(token))
        if token == eos or len(tokens) == max_new_tokens:
            break
    return tokens


def tokens_per_s(llms: dict[str, Any], prompts: list[list[int]], n: int, rounds: int) -> dict:
    """Median tokens/s of each model: prompt + exactly `n` decoded tokens (EOS ignored, so every
    model does the same work), models interleaved prompt by prompt so that load drift on a
    shared machine hits all of them alike; one warm-up call each first."""
    for llm in llms.values():
        llamacpp_greedy(llm, prompts[0], 2, None)
    rates: dict[str, list[float]] = {name: [] for name in llms}
    for _ in range(rounds):
        for prompt in prompts:
            for name, llm in llms.items():
                start = time.perf_counter()
                llamacpp_greedy(llm, prompt, n, None)
                rates[name].append(n / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def transformers_greedy(hf_dir: Path, prompts: list[list[int]], max_new_tokens: int, eos: int):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                eos_token_id=eos, pad_token_id=eos,
            )  # fmt: skip
            out.append(ids[0, len(prompt) :].tolist())
    return out


def random_exports(
    out: Path, layers: int, hidden: int, exits: list[int], tokenizer: Path | None
) -> dict[str, Path]:
    """A random LLaMA-shaped HF model -> megatron -> HF full and exit-k exports."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf
    from soft.data import builtin
    from soft.data.tokenizer import Tokenizer

    tokenizer = tokenizer or builtin.BUILTIN_TOKENIZER_PATH
    heads = max(1, hidden // 128)
    config = LlamaConfig(
        vocab_size=Tokenizer.from_file(tokenizer).vocab_size, hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        initializer_range=0.5 / hidden**0.5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "hf")
    shutil.copy(tokenizer, out / "hf" / "tokenizer.model")
    meg = convert_hf_to_megatron(out / "hf", out / "megatron", dtype="fp32", progress=False)
    exports = {"full": convert_megatron_to_hf(ExportRequest(meg, out / "full", progress=False))}
    for k in exits:
        request = ExportRequest(meg, out / f"exit{k}", exit_layer=k, progress=False)
        exports[f"exit{k}"] = convert_megatron_to_hf(request)
    shutil.rmtree(out / "megatron")
    return exports


def run(args: argparse.Namespace, work: Path) -> tuple[list[dict], str]:
    from soft.data.tokenizer import Tokenizer

    if args.full:
        exports = {"full": Path(args.full)}
        exports.update({Path(d).name: Path(d) for d in args.exit})
    else:
        exit_layers = [int(k) for k in args.exit_layers.split(",")]
        tokenizer = Path(args.tokenizer) if args.tokenizer else None
        exports = random_exports(work, args.random_layers, args.hidden, exit_layers, tokenizer)
    tok = Tokenizer.from_file(exports["full"] / "tokenizer.model")
    prompts = [tok.encode(p, bos=True) for p in PROMPTS[: args.prompts]]
    n_ctx = max(len(p) for p in prompts) + args.max_new_tokens + 8
    rows, llms = [], {}
    try:
        for name, hf_dir in exports.items():
            layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
            gguf = convert_to_gguf(
                Path(args.converter), hf_dir, work / f"{name}.{args.outtype}.gguf", args.outtype
            )
            llms[name] = llm = open_gguf(gguf, n_ctx, args.threads)
            got = [llamacpp_greedy(llm, p, args.max_new_tokens, tok.eos_id) for p in prompts]
            reference = transformers_greedy(hf_dir, prompts, args.max_new_tokens, tok.eos_id)
            same = sum(a == b for a, b in zip(got, reference, strict=True))
            rows.append(
                {"model": name, "layers": layers, "gguf_mb": gguf.stat().st_size / 2**20,
                 "same_as_transformers": f"{same}/{len(prompts)}"}
            )  # fmt: skip
        rates = tokens_per_s(llms, prompts, args.max_new_tokens, args.rounds)
    finally:
        for llm in llms.values():
            llm.close()
    for row in rows:
        row["tokens_per_s"] = rates[row["model"]]
        row["speedup"] = row["tokens_per_s"] / rates["full"]
    return rows, table(rows)


def table(rows: list[dict]) -> str:
    lines = [
        "| model | layers | GGUF MiB | tokens/s | speed-up vs full | greedy tokens = transformers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layers']} | {r['gguf_mb']:.0f} | {r['tokens_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['same_as_transformers']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", help="HF export of the full model")
    parser.add_argument("--exit", action="append", default=[], help="HF export of an exit")
    parser.add_argument("--random-layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--exit-layers", default="4,8")
    parser.add_argument("--tokenizer", help="tokenizer.model for the random model")
    parser.add_argument("--converter", default=str(default_converter()))
    parser.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the prompts")
    parser.add_argument("--append-results", help="append the table (with date, machine) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soft-llamacpp-") as tmp:
        rows, text = run(args, Path(tmp))
    print(text)
    if args.append_results:
        import llama_cpp

        command = "python benchmarks/bench_llamacpp.py " + " ".join(argv or sys.argv[1:])
        header = (
            f"\n### llama.cpp: exit-k exports vs the full model "
            f"({datetime.date.today().isoformat()})\n\n"
            f"Machine: {platform.processor() or platform.machine()}, {args.threads} threads; "
            f"llama-cpp-python {llama_cpp.__version__}; GGUF {args.outtype}; "
            f"{args.max_new_tokens} new tokens per prompt, {args.prompts} prompts x "
            f"{args.rounds} rounds, models interleaved; median.\n"
            f"Command: `{command}`\n\n"
        )
        with open(args.append_results, "a") as handle:
            handle.write(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
