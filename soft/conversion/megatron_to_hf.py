"""megatron-core distributed checkpoint (any TP/PP layout) -> HF folder of the model's family
(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM: `model.family`).

The checkpoint is read one layer at a time and written into safetensors shards as it goes, so
memory stays at about one layer plus one shard. With `exit_layer=K` the output is the
standalone sub-model of SoFT: the first K layers, the model's own final norm and LM head.

config.json records the exit plan the model was trained with (`soft_exit_layers`,
`soft_exit_weights`, `soft_exit_mode`); a sub-model export also records
`soft_source_exit_layer: K` and keeps the exits <= K with their trained weights.

ICT checkpoints (`soft.mode=ict`: frozen SFT backbone, one trained norm + head per early exit)
also get `exit_heads.safetensors` beside HF's own files (which stay the architecture's plain
weights): `exit_heads.<k>.norm.weight` [hidden] and `exit_heads.<k>.lm_head.weight`
[vocab, hidden] per early exit k, listed in config.json as `soft_exit_heads: [k, ...]`.
A sub-model export at K keeps the heads of exits k < K; if K has a head, the K-layer model's
own `model.norm` / `lm_head` ARE that head (that is what sub-model K is after ICT), and its
head is then not tied to the embedding even when the model's is.

Tied embeddings: no `lm_head.weight` is written and config.json says tie_word_embeddings.

A LoRA run's checkpoint (adapters only) is exported merged into the base checkpoint its
manifest names, or as a PEFT adapter folder with `peft_adapter`: soft.conversion.peft_export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from soft.checkpointing.checkpoint import verify
from soft.checkpointing.directory import find_checkpoint
from soft.config.errors import ConfigError
from soft.config.root import RootConfig, load_config
from soft.conversion import export_format as fmt
from soft.conversion import hf_io, megatron_io, peft_export
from soft.conversion.hf_to_megatron import shapes_of
from soft.conversion.mapping import EMBEDDING, Row, Shapes, exit_head_rows, head_rows, layer_rows
from soft.conversion.output import atomic_output_dir
from soft.data.tokenizer import Tokenizer
from soft.models.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # HF's usual 5 GB shards


@dataclass
class ExportRequest:
    checkpoint_dir: Path
    out_dir: Path
    exit_layer: int | None = None
    dtype: str = "auto"  # auto = as stored in the checkpoint
    tokenizer: Path | None = None  # default: the run's data.tokenizer_path (or the built-in one)
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False
    progress: bool = True
    allow_unverified: bool = False  # a checkpoint without manifest (written before checksums)
    peft_adapter: bool = False  # an adapter run: a PEFT adapter folder instead of merged weights
    base_model: str | None = None  # --peft-adapter: adapter_config's base_model_name_or_path


def read_run_config(ckpt: Path) -> RootConfig:
    path = ckpt / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"checkpoint '{ckpt}' has no config.yaml (written by the launcher and the HF converter)"
        )
    return load_config(path)


def _tokenizer(cfg: RootConfig, override: Path | None) -> Tokenizer:
    """The run's tokenizer (data.tokenizer_path, or the built-in one), or `override`."""
    from soft.data import builtin
    from soft.data.tokenizer import load_tokenizer

    path = override or (
        Path(cfg.data.tokenizer_path) if cfg.data.tokenizer_path else builtin.BUILTIN_TOKENIZER_PATH
    )
    if not path.exists():
        raise ConfigError(
            f"tokenizer '{path}' (data.tokenizer_path of the run) does not exist; pass --tokenizer"
        )
    return load_tokenizer(path)


def _true_vocab(cfg: RootConfig, tokenizer: Tokenizer) -> int:
    """model.vocab_size when set, else the tokenizer's (what the launcher built the model with)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    return tokenizer.vocab_size


def _write_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    """A Hugging Face tokenizer's files as they are (chat template included); a SentencePiece
    model with the tokenizer.json / tokenizer_config.json that reproduce it."""
    from soft.data.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        hf_io.copy_tokenizer_files(tokenizer.folder, out)
    else:
        hf_io.write_tokenizer(Path(tokenizer.path), out, max_length)


def exit_plan_fields(cfg: RootConfig, exit_layer: int | None) -> dict[str, Any]:
    plan = cfg.exit_plan()
    pairs = [
        (k, w)
        for k, w in zip(plan.layers, plan.weights, strict=True)
        if exit_layer is None or k <= exit_layer
    ]
    out: dict[str, Any] = {
        fmt.EXIT_LAYERS_KEY: [k for k, _ in pairs],
        fmt.EXIT_WEIGHTS_KEY: [w for _, w in pairs],
        fmt.EXIT_MODE_KEY: cfg.soft.mode,
    }
    if exit_layer is not None:
        out[fmt.SOURCE_EXIT_LAYER_KEY] = exit_layer
        out[fmt.SOURCE_NUM_LAYERS_KEY] = cfg.model.num_layers
    return out


# What the export reads weights from: the checkpoint, or it with LoRA adapters merged in.
Reader = megatron_io.CheckpointReader | peft_export.MergedReader


def _hf_name_tensors(
    row: Row, layer: int | None, tensor: torch.Tensor, shapes: Shapes, dtype: torch.dtype
) -> list[tuple[str, torch.Tensor]]:
    return list(
        zip(row.hf_names(layer), (t.to(dtype) for t in row.to_hf(tensor, shapes)), strict=True)
    )


def _export_weights(
    reader: Reader,
    writer: hf_io.ShardedSafetensorsWriter,
    shapes: Shapes,
    model: ModelConfig,
    num_layers: int,
    dtype: torch.dtype,
    progress: bool,
    final_head: tuple[Row, ...],
) -> None:
    """Embedding, then one layer per load, then the final norm and head, each written at once.

    `final_head`: the rows written as `model.norm` / `lm_head` (the model's own, without a
    head when tied; an ICT exit's own head for a sub-model export at that exit)."""
    rows = layer_rows(model)
    groups: list[list[tuple[Row, int | None]]] = [[(EMBEDDING, None)]]
    groups += [[(row, layer) for row in rows] for layer in range(num_layers)]
    groups.append([(row, None) for row in final_head])
    for group in tqdm(groups, desc="megatron -> HF", unit="group", disable=not progress):
        for name, tensor in _read_hf(reader, group, shapes, dtype):
            writer.add(name, tensor)


def _read_hf(
    reader: Reader, group: list[tuple[Row, int | None]], shapes: Shapes, dtype: torch.dtype
) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of one group of rows, read from the checkpoint in one load."""
    loaded = reader.read(group, shapes)
    out = []
    for row, layer in group:
        param = row.megatron.replace("*", str(layer)) if layer is not None else row.megatron
        out += _hf_name_tensors(row, layer, loaded.pop(param), shapes, dtype)
    return out


def ict_head_exits(cfg: RootConfig) -> tuple[int, ...]:
    """Exits whose ICT head the checkpoint holds: every early exit in ict mode, else none."""
    plan = cfg.exit_plan()
    return plan.early if plan.separate_heads else ()


def _check_heads_present(reader: Reader, ckpt: Path, heads: tuple[int, ...]) -> None:
    """Fail before writing anything when an ICT checkpoint lacks a head (e.g. a run saved
    before its heads were added)."""
    for k in heads:
        for row in exit_head_rows(k):
            if row.megatron not in reader.metadata:
                raise ConfigError(
                    f"checkpoint '{ckpt}' (soft.mode=ict) has no tensor '{row.megatron}': an ICT "
                    f"checkpoint holds one head per early exit {list(heads)}"
                )


def _export_exit_heads(
    reader: Reader, out: Path, shapes: Shapes, heads: list[int], dtype: torch.dtype
) -> None:
    """exit_heads.safetensors: the ICT heads, vocabulary rows cut back like lm_head's."""
    tensors: dict[str, torch.Tensor] = {}
    for k in heads:
        for name, tensor in _read_hf(reader, [(r, None) for r in exit_head_rows(k)], shapes, dtype):
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(out / fmt.EXIT_HEADS_FILE), metadata={"format": "pt"})


def _open_checkpoint(req: ExportRequest) -> tuple[Path, RootConfig]:
    """The iter_* folder --checkpoint-dir names, verified, and its run's config."""
    found = find_checkpoint(req.checkpoint_dir)
    if found is None:
        raise ConfigError(
            f"--checkpoint-dir '{req.checkpoint_dir}' is not a checkpoint: expected an iter_* folder "
            "or a checkpoints folder with a 'latest' file"
        )
    if found.note:
        log.warning("--checkpoint-dir: %s", found.note)
    ckpt = found.path
    # A damaged file is an error naming it, not an export of wrong weights.
    verify(ckpt, allow_unverified=req.allow_unverified)
    return ckpt, read_run_config(ckpt)


def convert_megatron_to_hf(req: ExportRequest) -> Path:
    """The HF folder of a checkpoint; an adapter run's adapters merged into the base they name
    (soft.conversion.peft_export), or with `req.peft_adapter` written as a PEFT adapter."""
    ckpt, cfg = _open_checkpoint(req)
    model = cfg.model
    hf_io.export_family(model)  # an architecture that cannot express the model: fail first
    num_layers = model.num_layers if req.exit_layer is None else req.exit_layer
    if not 1 <= num_layers <= model.num_layers:
        raise ConfigError(
            f"--exit-layer {req.exit_layer} is outside 1..{model.num_layers} (the model's layers)"
        )
    adapter_run = peft_export.open_adapter_run(
        ckpt, cfg, verify_base=not req.peft_adapter, allow_unverified=req.allow_unverified
    )
    if req.peft_adapter:
        return peft_export.export_peft_adapter(req, ckpt, cfg, num_layers, adapter_run)
    tokenizer = _tokenizer(cfg, req.tokenizer)
    vocab = _true_vocab(cfg, tokenizer)
    reader: Reader
    inputs = [Path(req.checkpoint_dir), ckpt]
    if adapter_run is None:
        reader = megatron_io.CheckpointReader(ckpt, model.num_layers)
    else:
        base, adapters = adapter_run
        reader = peft_export.MergedReader(
            megatron_io.CheckpointReader(base, model.num_layers), adapters
        )
        inputs.append(base)
        log.info("merging the adapters of %s into the base weights of %s", ckpt, base)
    if reader.padded_vocab() < vocab:
        raise ConfigError(
            f"checkpoint '{ckpt}' has {reader.padded_vocab()} vocabulary rows, fewer than {vocab}"
        )
    shapes = shapes_of(model, vocab, reader.padded_vocab())
    dtype_name = req.dtype if req.dtype != "auto" else _dtype_name(reader.dtype())
    if dtype_name not in hf_io.TORCH_DTYPES:
        raise ConfigError(
            f"--dtype: expected auto or one of {sorted(hf_io.TORCH_DTYPES)}, got '{req.dtype}'"
        )
    all_heads = ict_head_exits(cfg)
    _check_heads_present(reader, ckpt, all_heads)
    heads = [k for k in all_heads if k < num_layers]
    final_head = exit_head_rows(num_layers, as_final=True) if num_layers in all_heads else None
    torch_dtype = hf_io.TORCH_DTYPES[dtype_name]
    with atomic_output_dir(Path(req.out_dir), req.overwrite, inputs=inputs) as tmp:
        writer = hf_io.ShardedSafetensorsWriter(tmp, req.max_shard_bytes)
        head = final_head or head_rows(model)
        _export_weights(reader, writer, shapes, model, num_layers, torch_dtype, req.progress, head)
        writer.finish()
        if heads:
            _export_exit_heads(reader, tmp, shapes, heads, torch_dtype)
        _write_tokenizer(tokenizer, tmp, model.max_position_embeddings)
        extra = {fmt.EXIT_HEADS_KEY: heads} if heads else {}
        plan = {} if _never_trained(ckpt) else exit_plan_fields(cfg, req.exit_layer)
        tied = model.tie_word_embeddings and final_head is None
        fields = {**plan, **extra}
        _write_configs(tmp, cfg, vocab, num_layers, dtype_name, tokenizer, fields, tied)
    log.info(
        "wrote %s (%d of %d layers, %s)", req.out_dir, num_layers, model.num_layers, dtype_name
    )
    if heads:
        log.info("ICT heads of exits %s written to %s", heads, fmt.EXIT_HEADS_FILE)
    if final_head:
        log.info("model.norm / lm_head are exit %d's ICT head", num_layers)
    return Path(req.out_dir).absolute()


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in hf_io.TORCH_DTYPES.items()}[dtype]


def _never_trained(ckpt: Path) -> bool:
    """An HF import exported as it is: its config.json must not claim a SoFT exit plan."""
    from soft.checkpointing.manifest import read_manifest
    from soft.conversion.hf_to_megatron import IMPORTED_FROM_HF

    return IMPORTED_FROM_HF in (read_manifest(ckpt) or {})


def _write_configs(
    out: Path,
    cfg: RootConfig,
    vocab: int,
    num_layers: int,
    dtype: str,
    tokenizer: Tokenizer,
    extra_fields: dict[str, Any],
    tied: bool,
) -> None:
    from transformers import GenerationConfig

    from soft.data.tokenizer import HFTokenizer

    # The BOS the tokenizer defines (a Hugging Face one may define one it never adds).
    bos = tokenizer.hf.bos_token_id if isinstance(tokenizer, HFTokenizer) else tokenizer.bos_id
    extra = {
        "bos_token_id": bos,
        "eos_token_id": tokenizer.eos_id,
        **extra_fields,
    }
    config = hf_io.hf_config_from_model(cfg.model, vocab, num_layers, dtype, extra, tied)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
