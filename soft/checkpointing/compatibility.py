"""Does a checkpoint belong to the run this config asks for?

Every checkpoint holds the resolved config it was saved with (config.yaml) and, in its
manifest, the identity of the tokenizer (its kind, sentencepiece or hf; the sha256 of the
SentencePiece model or of the Hugging Face tokenizer files; the vocabulary size). An HF import
also lists every form its folder offers (`tokenizer_forms`: the tokenizer.model and the
tokenizer.json of one model), any of which may fine-tune it.
Before any weight is read, the request is compared with them, key by key. Every config key is
in exactly one class (tests/checkpointing/test_compatibility.py keeps it so):

- ARCHITECTURE: the meaning of the stored weights. A difference is an error whenever weights
  are loaded (resume or fine-tuning): 8 heads reading a 4-head checkpoint's QKV would train on
  reinterpreted weights without any shape error. (The vocabulary is checked through the
  tokenizer's identity and every tensor's stored shape, soft.checkpointing.requests.)
- RUN: what the resumed run is. A difference is an error on resume: another exit plan, data,
  seed or starting checkpoint is another run, which belongs in another train.output_dir.
- APPLIED: may change on resume (learning rate and schedule, intervals, layout, ...): the new
  value is applied and logged.
- STARTING_POINT, BY_IDENTITY: see their comments.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from soft.checkpointing.directory import CONFIG, CheckpointError
from soft.checkpointing.manifest import read_manifest

log = logging.getLogger(__name__)

ARCHITECTURE = (
    "model.num_layers",
    "model.hidden_size",
    "model.ffn_hidden_size",
    "model.num_attention_heads",
    "model.num_query_groups",
    "model.rotary_base",
    "model.norm_epsilon",
    "model.head_dim",
    "model.qkv_bias",
    "model.qk_layernorm",
    "model.tie_word_embeddings",
    "model.rope_scaling",
    "model.rope_scaling_factor",
    # What an export writes (config.json's architecture); a fine-tune inherits it.
    "model.family",
)
RUN = (
    "soft.mode",
    "soft.exit_layers",
    "soft.exit_weights",
    "model.params_dtype",
    "train.seed",
    "train.global_batch_size",
    "data.format",
    "data.prompt_template",
    "data.train_path",
    "data.valid_fraction",
    "data.seq_length",
    "data.overlong",
    "data.answer_alias_index",
    "data.text_field",
    "data.builtin_num_samples",
    # Samples are packs with packing on: the saved sample count means another order without.
    "data.packing",
    # An adapter checkpoint holds adapters of this shape only; a full one has none.
    "peft.method",
    "peft.rank",
    "peft.alpha",
    "peft.target_modules",
    "peft.layers",
    "peft.train_final_norm",
)
# What a run started from: part of RUN when a job resumes its own run folder; not compared when
# it continues from another folder's checkpoint (whose own starting point does not matter).
STARTING_POINT = ("checkpoint.load_dir", "checkpoint.finetune")
# May change when a run resumes; the new value is applied and logged. (Most are read from the
# config at every step anyway; the schedule and Adam's betas/eps are re-applied after the load,
# soft.training.optim. A layout change reshards the checkpoint.)
APPLIED = (
    "model.max_position_embeddings",
    "model.init_method_std",
    "model.transformer_impl",
    "model.fp8",
    "model.fp8_recipe",
    "model.fp8_amax_history_len",
    "model.fp8_margin",
    "model.recompute_granularity",
    "model.recompute_method",
    "model.recompute_num_layers",
    "soft.loss_chunk_tokens",
    "soft.exit_loss",
    "soft.log_untrained_exits",
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "parallel.virtual_pipeline_model_parallel_size",
    "parallel.num_layers_in_first_pipeline_stage",
    "parallel.num_layers_in_last_pipeline_stage",
    "parallel.sequence_parallel",
    "parallel.use_distributed_optimizer",
    "parallel.overlap_grad_reduce",
    "parallel.overlap_param_gather",
    "parallel.backend",
    "data.valid_path",
    "data.cache_dir",
    "train.train_iters",
    "train.micro_batch_size",
    "train.lr",
    "train.min_lr",
    "train.lr_warmup_iters",
    "train.lr_decay_style",
    "train.weight_decay",
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_eps",
    "train.clip_grad",
    "train.log_interval",
    "train.eval_interval",
    "train.eval_iters",
    "train.output_dir",
    "train.exit_interval",
    "train.loss_scale",
    "train.initial_loss_scale",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "checkpoint.save_dir",
    "checkpoint.save_interval",
    "checkpoint.auto_resume",
    "checkpoint.start_over",
    "checkpoint.on_corrupt",
    "checkpoint.allow_unverified",
    "checkpoint.keep_last",
    "checkpoint.optimizer_format",
    "tracking.enabled",
    "tracking.tracking_uri",
    "tracking.experiment",
    "tracking.run_name",
    "peft.dropout",
)
# Compared in other ways: the vocabulary by the tokenizer's identity and the stored tensor
# shapes; the tokenizer by its kind and checksum (the same files may sit at another path).
BY_IDENTITY = ("model.vocab_size", "model.make_vocab_size_divisible_by", "data.tokenizer_path")

_HINT_RESUME = (
    "use a new train.output_dir for a different run, or checkpoint.start_over=true to move this "
    "folder's checkpoints and logs aside and start again"
)


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    requested: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.requested!r}"


def saved_config(ckpt: Path) -> dict[str, Any] | None:
    """The flattened config a checkpoint was saved with; None when it has none (foreign)."""
    from soft.config.core import flatten

    path = ckpt / CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"checkpoint config '{path}' is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config '{path}': expected a mapping")
    return flatten(data)


# What a fine-tuning run takes from the checkpoint it loads when its config does not say.
INHERITED_SHAPE = (
    *ARCHITECTURE,
    "model.vocab_size",
    "model.make_vocab_size_divisible_by",
    "model.max_position_embeddings",
)


def saved_model_shape(load_dir: str | Path) -> dict[str, Any]:
    """{model key (no prefix): value} of the checkpoint at `load_dir`; empty when there is no
    readable checkpoint config there (loading reports that later, with the details)."""
    from soft.checkpointing.directory import find_checkpoint

    try:
        found = find_checkpoint(load_dir)
        saved = saved_config(found.path) if found is not None else None
    except CheckpointError:
        return {}
    if not saved:
        return {}
    return {k.removeprefix("model."): saved[k] for k in INHERITED_SHAPE if k in saved}


def _normalised(flat: dict[str, Any]) -> dict[str, Any]:
    """Equal meanings spelled differently compare equal (null = the default they stand for)."""
    out = dict(flat)
    layers = out.get("model.num_layers")
    if out.get("model.num_query_groups") is None:
        out["model.num_query_groups"] = out.get("model.num_attention_heads")
    hidden, heads = out.get("model.hidden_size"), out.get("model.num_attention_heads")
    if "model.head_dim" in out and out["model.head_dim"] is None and hidden and heads:
        out["model.head_dim"] = hidden // heads
    if out.get("soft.exit_layers") is None and isinstance(layers, int):
        out["soft.exit_layers"] = list(range(1, layers + 1))
    weights, exits = out.get("soft.exit_weights"), out.get("soft.exit_layers")
    if isinstance(weights, list) and weights and sum(weights) > 0:
        out["soft.exit_weights"] = [round(w / sum(weights), 12) for w in weights]
    elif weights is None and isinstance(exits, list) and exits:
        out["soft.exit_weights"] = [round(1 / len(exits), 12) for _ in exits]
    for key in ("checkpoint.load_dir", "data.train_path"):
        if isinstance(out.get(key), str):
            out[key] = str(Path(out[key]))
    return out


def differences(
    saved: dict[str, Any], requested: dict[str, Any], keys: Iterable[str]
) -> list[Change]:
    saved, requested = _normalised(saved), _normalised(requested)
    return [
        Change(key, saved[key], requested.get(key))
        for key in keys
        if key in saved and saved[key] != requested.get(key)
    ]


def _describe(identity: dict[str, Any]) -> str:
    # Identities recorded before Hugging Face tokenizers were supported have no kind.
    kind = identity.get("kind", "sentencepiece")
    return (
        f"{identity.get('path')} ({kind}, {identity.get('vocab_size')} pieces, sha256 "
        f"{str(identity.get('sha256'))[:12]})"
    )


def _same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    kind = ("kind", "sentencepiece")
    return a.get("sha256") == b.get("sha256") and a.get(*kind) == b.get(*kind)


def _check_tokenizer(ckpt: Path, identity: dict[str, Any] | None) -> None:
    manifest = read_manifest(ckpt) or {}
    stored = manifest.get("tokenizer")
    if stored is None or identity is None:
        return  # written before tokenizer identities were recorded
    accepted = [stored, *manifest.get("tokenizer_forms", [])]
    if not any(_same_tokenizer(form, identity) for form in accepted):
        raise CheckpointError(
            f"checkpoint '{ckpt}' was trained with another tokenizer: {_describe(stored)} "
            f"there, {_describe(identity)} in this run; set data.tokenizer_path to the "
            "checkpoint's tokenizer"
        )


def check_weights_load(
    ckpt: Path, requested: dict[str, Any], tokenizer: dict[str, Any] | None, extract: bool
) -> None:
    """Fine-tuning from `ckpt`: its weights must mean what this model's config says."""
    saved = saved_config(ckpt)
    _check_tokenizer(ckpt, tokenizer)
    if saved is None:
        log.warning("checkpoint %s has no %s: its architecture is not checked", ckpt, CONFIG)
        return
    keys = [k for k in ARCHITECTURE if not (extract and k == "model.num_layers")]
    changes = differences(saved, requested, keys)
    if changes:
        hint = f"Its model section is in '{ckpt / CONFIG}' (an HF import also writes model.yaml: pass it with --config)"
        layers = next((c for c in changes if c.key == "model.num_layers"), None)
        if layers is not None and layers.saved > layers.requested:
            hint += (
                f"; to fine-tune the first {layers.requested} layers of this "
                f"{layers.saved}-layer model set soft.mode=extracted"
            )
        raise CheckpointError(
            f"checkpoint '{ckpt}' holds a different model than this config describes: "
            + "; ".join(f"{c} (checkpoint -> config)" for c in changes)
            + f". {hint}"
        )


def check_resume(
    ckpt: Path,
    requested: dict[str, Any],
    tokenizer: dict[str, Any] | None,
    ignore: tuple[str, ...] = (),
) -> list[Change]:
    """Resuming from `ckpt`: an error for a different model or run; returns the changes that
    are applied (logged by the caller). `ignore`: keys not compared at all."""
    saved = saved_config(ckpt)
    _check_tokenizer(ckpt, tokenizer)
    if saved is None:
        log.warning("checkpoint %s has no %s: the resumed config is not checked", ckpt, CONFIG)
        return []
    compared = [k for k in (*ARCHITECTURE, *RUN, *STARTING_POINT) if k not in ignore]
    refused = differences(saved, requested, compared)
    if refused:
        raise CheckpointError(
            f"the run in '{ckpt.parent}' was started with a different config; resuming it with "
            "this one would continue from the wrong state. Differences (saved -> requested): "
            + "; ".join(map(str, refused))
            + f". To resume it, repeat its settings (saved in '{ckpt / CONFIG}'); otherwise "
            + _HINT_RESUME
        )
    return differences(saved, requested, APPLIED)
