"""One entry point for the four greedy decoding modes of an exported SoFT model (an ICT
export's early exits decode through their own heads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from soft.config.errors import ConfigError
from soft.data.prompts import PromptTemplate, chat_tokenizer, render, text_prompt
from soft.evaluation.decoding import GenerationResult, LayerRunner, greedy_generate
from soft.evaluation.dynamic import check_thresholds, dynamic_generate
from soft.evaluation.model_io import ExportedModel, resolve_exits, validate_exits
from soft.evaluation.runner import stop_ids
from soft.evaluation.speculative import speculative_generate

MODES = ("full", "exit", "dynamic", "speculative")


@dataclass
class GenerateOptions:
    mode: str = "full"
    max_new_tokens: int = 64
    exit_layer: int | None = None
    draft_exit: int | None = None
    num_draft: int = 4
    thresholds: Sequence[float] | None = None
    exits: Sequence[int] | None = None  # dynamic mode; default: the exits recorded in config.json
    stop_at_newline: bool = False


def _one_exit(value: int | None, exported: ExportedModel, flag: str, default: int | None) -> int:
    if value is None:
        if default is None:
            raise ConfigError(f"{flag} is required for this mode")
        return default
    return validate_exits([value], exported.num_layers, flag)[0]


def _dynamic_exits(
    options: GenerateOptions, exported: ExportedModel
) -> tuple[list[int], list[float]]:
    if options.exits is None and exported.recorded_exits is None:
        raise ConfigError(
            f"--mode dynamic: '{exported.path / 'config.json'}' records no soft_exit_layers; "
            "pass --exits K1,K2,... (the trained exits)"
        )
    exits = resolve_exits(None if options.exits is None else list(options.exits), exported)
    if not options.thresholds:
        raise ConfigError("--mode dynamic needs --thresholds (one per early exit, or one for all)")
    try:
        return check_thresholds(exits, options.thresholds, exported.num_layers)
    except ValueError as exc:
        raise ConfigError(f"--thresholds: {exc}") from exc


def generate_ids(
    exported: ExportedModel, prompt_ids: list[int], options: GenerateOptions
) -> GenerationResult:
    """Greedy generation in `options.mode`; flags are validated here (ConfigError on misuse)."""
    if options.mode not in MODES:
        raise ConfigError(f"--mode: expected one of {', '.join(MODES)}, got '{options.mode}'")
    if options.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected >= 1, got {options.max_new_tokens}")
    runner = LayerRunner(exported.model, exported.exit_heads)
    stops = stop_ids(exported.tokenizer, options.stop_at_newline, exported.model)
    n = options.max_new_tokens
    if options.mode == "full":
        return greedy_generate(runner, prompt_ids, n, None, stops)
    if options.mode == "exit":
        k = _one_exit(options.exit_layer, exported, "--exit-layer", None)
        return greedy_generate(runner, prompt_ids, n, k, stops)
    if options.mode == "dynamic":
        exits, thresholds = _dynamic_exits(options, exported)
        return dynamic_generate(runner, prompt_ids, n, exits, thresholds, stops)
    shallowest = exported.recorded_exits[0] if exported.recorded_exits else None
    k = _one_exit(options.draft_exit, exported, "--draft-exit", shallowest)
    if options.num_draft < 1:
        raise ConfigError(f"--num-draft: expected >= 1, got {options.num_draft}")
    return speculative_generate(runner, prompt_ids, n, k, options.num_draft, stops)


def compare_with_full(result: GenerationResult, full: GenerationResult) -> dict:
    """Speed-up over the full model and how many leading tokens agree with its output."""
    agree = 0
    for mine, ref in zip(result.token_ids, full.token_ids, strict=False):
        if mine != ref:
            break
        agree += 1
    return {
        "full_tokens_per_s": full.tokens_per_s,
        "speedup": full.ms_per_token / result.ms_per_token if result.ms_per_token else None,
        "matching_prefix_with_full": agree,
        "identical_to_full": result.token_ids == full.token_ids,
    }


def generate_text(
    exported: ExportedModel,
    prompt: str,
    options: GenerateOptions,
    compare_full: bool = False,
    prompt_template: PromptTemplate = "alpaca",
) -> dict:
    """Prompt rendered as training renders it (soft.data.prompts.render: with the Alpaca
    template the text as it is after BOS; with the chat template one user turn and the
    template's generation prompt) -> {token_ids, text, mode, stats...}.

    `compare_full` also runs the full model (after a warm-up of both) for speed-up and quality.
    """
    if prompt_template == "chat":
        chat_tokenizer(exported.tokenizer, "--prompt-template")
    prompt_ids = render(exported.tokenizer, text_prompt(prompt_template, prompt)).prompt_ids
    if compare_full:  # warm-up so neither timing pays one-off costs
        warm = GenerateOptions(**{**options.__dict__, "max_new_tokens": 2})
        generate_ids(exported, prompt_ids, warm)
        generate_ids(exported, prompt_ids, GenerateOptions(max_new_tokens=2))
    result = generate_ids(exported, prompt_ids, options)
    extra = {}
    if compare_full:
        full_options = GenerateOptions(
            max_new_tokens=options.max_new_tokens, stop_at_newline=options.stop_at_newline
        )
        extra = compare_with_full(result, generate_ids(exported, prompt_ids, full_options))
    stops = stop_ids(exported.tokenizer, False, exported.model)
    return {
        "mode": options.mode,
        "prompt_ids": prompt_ids,
        "token_ids": result.token_ids,
        "text": exported.tokenizer.decode([t for t in result.token_ids if t not in stops]),
        "num_tokens": len(result.token_ids),
        "elapsed_s": result.elapsed_s,
        "tokens_per_s": result.tokens_per_s,
        "ms_per_token": result.ms_per_token,
        **result.stats,
        **extra,
    }
