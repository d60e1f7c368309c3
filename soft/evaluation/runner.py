"""Evaluating every SoFT exit of an exported model: loss, perplexity, exact match, speed.

Exits with an ICT head (`ExportedModel.exit_heads`) are scored through it. When exact match is
scored, each example's case-sensitive hit (1/0) per exit is kept too (`per_example`), so that
two models or exits can be compared prompt by prompt (win rates), not only on the mean.

Results JSON: {"params": {..., "exit_heads": [k, ...]}, "exits": [one ExitRecord per exit],
"per_example": {"<layer>": [1 or 0 per example, in order]}} ("per_example" only when exact
match is scored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from soft.config.errors import ConfigError
from soft.data.tokenizer import Tokenizer
from soft.evaluation.decoding import LayerRunner, greedy_generate
from soft.evaluation.losses import TokenizedExample, exit_nll, tokenize_example
from soft.evaluation.metrics import exact_match
from soft.evaluation.model_io import ExportedModel, load_exported_model, resolve_exits
from soft.evaluation.records import load_eval_examples
from soft.evaluation.report import log_to_mlflow, markdown_table, plot_exits

TABLE_COLUMNS = (
    "layer", "loss", "perplexity", "exact_match", "exact_match_normalized",
    "ms_per_token", "tokens_per_s", "speedup",
)  # fmt: skip


@dataclass
class ExitRecord:
    """One exit's results. `loss` is the token-weighted mean NLL over all response tokens
    (EOS included); `ms_per_token` is end-to-end greedy generation time (prefill + decode)
    divided by generated tokens; `speedup` = full model's ms_per_token / this exit's."""

    layer: int
    loss: float
    perplexity: float
    exact_match: float | None
    exact_match_normalized: float | None
    ms_per_token: float | None
    tokens_per_s: float | None
    speedup: float | None
    generated_tokens: int


def stop_ids(tokenizer: Tokenizer, at_newline: bool) -> set[int]:
    """EOS, plus every piece that is or contains a newline (LLaMA-2: the byte piece <0x0A>)."""
    stops = {tokenizer.eos_id}
    if at_newline:
        stops |= {i for i, p in enumerate(tokenizer.pieces) if p == "<0x0A>" or "\n" in p}
    return stops


@dataclass
class ExitEvaluation:
    """`records`: one per exit, shallowest first. `per_example`: exit -> exact-match hit (1/0)
    of every example in order, or None when exact match was not scored."""

    records: list[ExitRecord]
    per_example: dict[int, list[int]] | None


class _ExitTally:
    """Running sums for one exit (and its per-example exact-match hits)."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.hits_per_example: list[int] = []
        self.hits_normalized = 0
        self.gen_tokens = 0
        self.gen_seconds = 0.0

    @property
    def hits(self) -> int:
        return sum(self.hits_per_example)

    @property
    def answered(self) -> int:
        return len(self.hits_per_example)

    def record(self, generated_tokens: int, seconds: float) -> None:
        self.gen_tokens += generated_tokens
        self.gen_seconds += seconds

    def score(self, answer: str, aliases: Sequence[str]) -> None:
        self.hits_per_example.append(int(exact_match(answer, aliases)))
        self.hits_normalized += exact_match(answer, aliases, normalized=True)


def _record(layer: int, tally: _ExitTally, scored_em: bool) -> ExitRecord:
    loss = tally.nll / tally.tokens
    timed = tally.gen_tokens > 0 and tally.gen_seconds > 0
    scored_em = scored_em and tally.answered > 0  # --max-new-tokens 0: nothing generated
    return ExitRecord(
        layer=layer,
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),  # avoid OverflowError on a garbage exit
        exact_match=tally.hits / tally.answered if scored_em else None,
        exact_match_normalized=tally.hits_normalized / tally.answered if scored_em else None,
        ms_per_token=1000.0 * tally.gen_seconds / tally.gen_tokens if timed else None,
        tokens_per_s=tally.gen_tokens / tally.gen_seconds if timed else None,
        speedup=None,
        generated_tokens=tally.gen_tokens,
    )


def evaluate_exits(
    exported: ExportedModel,
    examples: Sequence[TokenizedExample],
    exits: Sequence[int],
    max_new_tokens: int = 32,
    score_exact_match: bool = False,
    stop_at_newline: bool = False,
    progress: bool = True,
) -> ExitEvaluation:
    """Per-exit records (+ per-example exact match when scored). The full model is always
    included: it is the speed-up reference.

    Generation for all exits is interleaved per example, so load drift on a shared machine
    affects every exit alike; each exit runs as a truncated model with its own KV cache.
    """
    num_layers = exported.num_layers
    exits = sorted(set(exits) | {num_layers})
    runner = LayerRunner(exported.model, exported.exit_heads)
    tokenizer = exported.tokenizer
    stops = stop_ids(tokenizer, stop_at_newline)
    tallies = {k: _ExitTally() for k in exits}
    if max_new_tokens > 0:  # warm-up: first calls pay one-off allocation / kernel selection costs
        for k in exits:
            greedy_generate(runner, examples[0].prompt_ids, 2, exit_layer=k, stop_ids=stops)
    for example in tqdm(examples, desc="eval exits", unit="example", disable=not progress):
        for k, (nll, count) in exit_nll(
            exported.model, example.loss_ids, example.num_target, exits, exported.exit_heads
        ).items():
            tallies[k].nll += nll
            tallies[k].tokens += count
        if max_new_tokens <= 0:
            continue
        for k in exits:
            result = greedy_generate(runner, example.prompt_ids, max_new_tokens, k, stops)
            tallies[k].record(len(result.token_ids), result.elapsed_s)
            if score_exact_match:
                answer = tokenizer.decode([t for t in result.token_ids if t not in stops])
                tallies[k].score(answer, example.answers)
    records = [_record(k, tallies[k], score_exact_match) for k in exits]
    full = records[-1]
    for record in records:
        if record.ms_per_token and full.ms_per_token:
            record.speedup = full.ms_per_token / record.ms_per_token
    scored = score_exact_match and max_new_tokens > 0
    per_example = {k: tallies[k].hits_per_example for k in exits} if scored else None
    return ExitEvaluation(records, per_example)


def run_eval_exits(
    model_dir: str | Path,
    data: str | Path,
    fmt: str,
    exits: list[int] | None = None,
    max_new_tokens: int = 32,
    limit: int | None = None,
    out: str | Path = "eval_exits.json",
    mlflow_uri: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> dict:
    """The whole eval_exits job: returns {"records", "per_example", "table", "json", "plot",
    "mlflow_run_id"}; `per_example` is {"<layer>": [1/0 per example]} or None (EM not scored)."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: expected >= 0, got {max_new_tokens}")
    raw = load_eval_examples(data, fmt, limit)  # cheap checks of the data before the model loads
    exported = load_exported_model(model_dir, device=device, dtype=dtype)
    chosen = resolve_exits(exits, exported)
    examples = [tokenize_example(exported.tokenizer, e) for e in raw]
    is_qa = fmt == "triviaqa"
    evaluation = evaluate_exits(
        exported, examples, chosen, max_new_tokens,
        score_exact_match=fmt in ("triviaqa", "alpaca"), stop_at_newline=is_qa, progress=progress,
    )  # fmt: skip
    rows = [asdict(r) for r in evaluation.records]
    per_example = (
        None
        if evaluation.per_example is None
        else {str(k): hits for k, hits in evaluation.per_example.items()}
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {
        "model_dir": str(model_dir), "data": str(data), "format": fmt, "exits": chosen,
        "num_examples": len(examples), "max_new_tokens": max_new_tokens,
        "device": str(exported.model.lm_head.weight.device), "dtype": str(exported.model.dtype),
        "exit_heads": sorted(k for k in exported.exit_heads if k in {r["layer"] for r in rows}),
    }  # fmt: skip
    results: dict = {"params": params, "exits": rows}
    if per_example is not None:
        results["per_example"] = per_example
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot = plot_exits(
        rows, out.with_suffix(".png"), title=f"{Path(model_dir).name} on {Path(data).name}"
    )
    table = markdown_table(rows, TABLE_COLUMNS)
    table_path = out.with_suffix(".md")
    table_path.write_text(table + "\n")
    run_id = None
    if mlflow_uri:
        run_id = log_to_mlflow(
            mlflow_uri,
            params,
            rows,
            [out, plot, table_path],
            artifact_root=out.parent / "mlartifacts",
        )
    return {
        "records": rows,
        "per_example": per_example,
        "table": table,
        "json": out,
        "plot": plot,
        "mlflow_run_id": run_id,
    }
