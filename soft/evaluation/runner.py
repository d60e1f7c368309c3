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
from typing import TYPE_CHECKING

from tqdm import tqdm

from soft.config.errors import ConfigError
from soft.data.prompts import PromptTemplate, chat_tokenizer
from soft.data.tokenizer import Tokenizer
from soft.evaluation.batched import SubModels, exit_nll_batch, generate_batch, length_batches
from soft.evaluation.decoding import LayerRunner, greedy_generate
from soft.evaluation.losses import TokenizedExample, exit_nll, tokenize_example
from soft.evaluation.metrics import exact_match
from soft.evaluation.model_io import ExportedModel, load_exported_model, resolve_exits
from soft.evaluation.records import load_eval_examples
from soft.evaluation.report import log_to_mlflow, markdown_table, plot_exits

if TYPE_CHECKING:
    from soft.evaluation.causal_lm import CausalLM

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


def stop_ids(tokenizer: Tokenizer, at_newline: bool, model: CausalLM | None = None) -> set[int]:
    """EOS (the tokenizer's, and every EOS id in the model's generation_config: a chat model's
    end-of-turn token, e.g. LLaMA-3's <|eot_id|>), plus every id whose text contains a
    newline when asked (LLaMA-2: the byte piece <0x0A>)."""
    stops = {tokenizer.eos_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        stops |= {int(configured)} if isinstance(configured, int) else {int(i) for i in configured}
    if at_newline:
        stops |= tokenizer.newline_ids()
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
    batch_size: int = 1,
) -> ExitEvaluation:
    """Per-exit records (+ per-example exact match when scored). The full model is always
    included: it is the speed-up reference.

    `batch_size` 1: one example at a time through `exit_nll` and `greedy_generate` (each exit a
    truncated model with its own KV cache); timings are single-stream latency. Larger: examples
    of similar length batched (soft.evaluation.batched: right-padded loss pass, left-padded
    `generate`); the same losses (to float rounding) and tokens, and timings are per token of
    the batch's throughput. Generation for all exits is interleaved per example or batch, so
    load drift on a shared machine affects every exit alike.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size: expected >= 1, got {batch_size}")
    num_layers = exported.num_layers
    exits = sorted(set(exits) | {num_layers})
    tokenizer = exported.tokenizer
    stops = stop_ids(tokenizer, stop_at_newline, exported.model)
    tallies = {k: _ExitTally() for k in exits}
    if batch_size == 1:
        nll, generated = _one_by_one(
            exported, examples, exits, max_new_tokens, stops, tallies, progress
        )
    else:
        nll, generated = _batched(
            exported, examples, exits, max_new_tokens, stops, tallies, progress, batch_size
        )
    for i in range(len(examples)):  # tallies in example order, whatever order the batches ran in
        for k in exits:
            tallies[k].nll += nll[i][k][0]
            tallies[k].tokens += nll[i][k][1]
            if max_new_tokens > 0 and score_exact_match:
                tokens = [t for t in generated[k][i] if t not in stops]
                tallies[k].score(tokenizer.decode(tokens), examples[i].answers)
    records = [_record(k, tallies[k], score_exact_match) for k in exits]
    full = records[-1]
    for record in records:
        if record.ms_per_token and full.ms_per_token:
            record.speedup = full.ms_per_token / record.ms_per_token
    scored = score_exact_match and max_new_tokens > 0
    per_example = {k: tallies[k].hits_per_example for k in exits} if scored else None
    return ExitEvaluation(records, per_example)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    """Examples done, examples/s and the ETA (tqdm's own estimate)."""
    return tqdm(total=total, desc=desc, unit="example", disable=not progress, smoothing=0.1)


# Per example: {exit: (summed NLL, target tokens)}; per exit: each example's generated tokens.
Losses = list[dict[int, tuple[float, int]]]
Generated = dict[int, list[list[int]]]


def _one_by_one(
    exported: ExportedModel,
    examples: Sequence[TokenizedExample],
    exits: list[int],
    max_new_tokens: int,
    stops: set[int],
    tallies: dict[int, _ExitTally],
    progress: bool,
) -> tuple[Losses, Generated]:
    nll: Losses = [{} for _ in examples]
    generated: Generated = {k: [[] for _ in examples] for k in exits}
    runner = LayerRunner(exported.model, exported.exit_heads)
    if max_new_tokens > 0:  # warm-up: first calls pay one-off allocation / kernel selection costs
        for k in exits:
            greedy_generate(runner, examples[0].prompt_ids, 2, exit_layer=k, stop_ids=stops)
    with _bar(len(examples), "eval exits", progress) as bar:
        for i, example in enumerate(examples):
            nll[i] = exit_nll(
                exported.model, example.loss_ids, example.targets, exits, exported.exit_heads
            )
            if max_new_tokens > 0:
                for k in exits:
                    result = greedy_generate(runner, example.prompt_ids, max_new_tokens, k, stops)
                    tallies[k].record(len(result.token_ids), result.elapsed_s)
                    generated[k][i] = result.token_ids
            bar.update(1)
    return nll, generated


def _batched(
    exported: ExportedModel,
    examples: Sequence[TokenizedExample],
    exits: list[int],
    max_new_tokens: int,
    stops: set[int],
    tallies: dict[int, _ExitTally],
    progress: bool,
    batch_size: int,
) -> tuple[Losses, Generated]:
    nll: Losses = [{} for _ in examples]
    generated: Generated = {k: [[] for _ in examples] for k in exits}
    model, heads = exported.model, exported.exit_heads
    pad = exported.tokenizer.pad_id
    batches = length_batches([len(e.loss_ids) for e in examples], batch_size)
    with _bar(len(examples), "losses", progress) as bar:
        for batch in batches:
            results = exit_nll_batch(
                model, [examples[i].loss_ids for i in batch],
                [examples[i].targets for i in batch], exits, heads, pad,
            )  # fmt: skip
            for i, result in zip(batch, results, strict=True):
                nll[i] = result
            bar.update(len(batch))
    if max_new_tokens <= 0:
        return nll, generated
    views = SubModels(model, heads)
    batches = length_batches([len(e.prompt_ids) for e in examples], batch_size)
    first = [examples[i].prompt_ids for i in batches[0]]
    for k in exits:  # warm-up at the real batch shape
        generate_batch(views(k), first, 2, stops, pad)
    with _bar(len(examples), "generation", progress) as bar:
        for batch in batches:
            prompts = [examples[i].prompt_ids for i in batch]
            for k in exits:
                outputs, elapsed = generate_batch(views(k), prompts, max_new_tokens, stops, pad)
                tallies[k].record(sum(len(o) for o in outputs), elapsed)
                for i, tokens in zip(batch, outputs, strict=True):
                    generated[k][i] = tokens
            bar.update(len(batch))
    return nll, generated


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
    batch_size: int = 1,
    prompt_template: PromptTemplate = "alpaca",
) -> dict:
    """The whole eval_exits job: returns {"records", "per_example", "table", "json", "plot",
    "mlflow_run_id"}; `per_example` is {"<layer>": [1/0 per example]} or None (EM not scored).
    `prompt_template`: how training rendered the examples (data.prompt_template)."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: expected >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: expected >= 1, got {batch_size}")
    # Cheap checks of the data before the model loads.
    raw = load_eval_examples(data, fmt, limit, template=prompt_template)
    exported = load_exported_model(model_dir, device=device, dtype=dtype)
    if prompt_template == "chat":
        chat_tokenizer(exported.tokenizer, "--prompt-template")
    chosen = resolve_exits(exits, exported)
    examples = [tokenize_example(exported.tokenizer, e) for e in raw]
    if max_new_tokens > 0 and any(not e.prompt_ids for e in examples):
        raise ConfigError(
            f"--format {fmt}: a document with an empty prompt and a tokenizer without BOS "
            f"('{exported.tokenizer.path}') leaves nothing to generate from; pass "
            "--max-new-tokens 0 (losses only)"
        )
    is_qa = fmt == "triviaqa"
    evaluation = evaluate_exits(
        exported, examples, chosen, max_new_tokens,
        score_exact_match=fmt in ("triviaqa", "alpaca", "messages"), stop_at_newline=is_qa, progress=progress,
        batch_size=batch_size,
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
        "num_examples": len(examples), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "prompt_template": prompt_template,
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
