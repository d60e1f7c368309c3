"""HF folder (LLaMA-2/3, Mistral, Qwen2/2.5, Qwen3) -> megatron-core distributed checkpoint +
model.yaml, without building a model.

Output layout (what `checkpoint.load_dir=OUT checkpoint.finetune=true` expects):

    OUT/iter_0000000/    torch_dist checkpoint (+ config.yaml, the resolved RootConfig)
    OUT/latest           "iter_0000000"
    OUT/model.yaml       model: section (+ data.tokenizer_path) for `--config` / `defaults:`
    OUT/tokenizer.*      the HF folder's tokenizer files, copied as they are (tokenizer.json,
                         tokenizer_config.json, special_tokens_map.json, chat template,
                         tokenizer.model, ...): `data.tokenizer_path=OUT` loads them

Memory: HF tensors are read one at a time (safetensors `safe_open`, mmap'd .bin), fused and cast
to the target dtype, and the source tensor is dropped; the checkpoint writer then holds one copy
of the weights in the target dtype (never a HF model plus a megatron model).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from soft.checkpointing.checkpoint import TrainState, save
from soft.config.errors import ConfigError
from soft.config.root import RootConfig
from soft.conversion import hf_io, megatron_io
from soft.conversion.mapping import (
    EMBEDDING,
    OUTPUT_LAYER,
    Shapes,
    check_shape,
    iter_rows,
    layer_rows,
)
from soft.conversion.output import atomic_output_dir
from soft.conversion.vocab import DEFAULT_MAX_TP, stable_divisor
from soft.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, load_tokenizer
from soft.models.config import ModelConfig

log = logging.getLogger(__name__)
IMPORTED_FROM_HF = "imported_from_hf"  # manifest key of an import's checkpoint

# The model: fields written to model.yaml (the rest keep their defaults).
MODEL_YAML_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "vocab_size", "make_vocab_size_divisible_by", "norm_epsilon", "rotary_base",
    "max_position_embeddings", "params_dtype",
    # the family's feature switches (the model code reads these, never `family`)
    "family", "head_dim", "qkv_bias", "qk_layernorm", "tie_word_embeddings", "rope_scaling",
    "rope_scaling_factor",
)  # fmt: skip


def shapes_of(model: ModelConfig, vocab: int, padded_vocab: int) -> Shapes:
    return Shapes(
        hidden=model.hidden_size,
        ffn=model.ffn_hidden_size,
        heads=model.num_attention_heads,
        groups=model.query_groups,
        head_dim=model.kv_channels,
        vocab=vocab,
        padded_vocab=padded_vocab,
    )


def build_sharded_state(
    source: hf_io.HFTensorSource,
    model: ModelConfig,
    shapes: Shapes,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, Any]:
    """{megatron parameter name: ShardedTensor/ShardedObject}, read from HF one tensor at a time."""
    sharded: dict[str, Any] = {}
    rows = list(iter_rows(model))
    last_of_layer = layer_rows(model)[-1]
    for row, layer in tqdm(rows, desc="HF -> megatron", unit="tensor", disable=not progress):
        names = row.hf_names(layer)
        tensors = []
        for name, expected in zip(names, row.hf_shapes(shapes), strict=True):
            tensor = source.get(name)
            check_shape(name, tensor, expected, str(source.dir))
            tensors.append(tensor.to(row.stored_dtype(dtype)))
        param = row.megatron.replace("*", str(layer)) if layer is not None else row.megatron
        fused = row.to_megatron(tensors, shapes).contiguous()
        sharded[param] = megatron_io.sharded_tensor(param, fused, model.num_layers)
        if layer is not None and row is last_of_layer:  # once per layer
            sharded.update(megatron_io.extra_state_objects(model, layer))
    if model.tie_word_embeddings:
        check_tied_head(source)
    return sharded


def check_tied_head(source: hf_io.HFTensorSource) -> None:
    """A tied model's LM head is its embedding: transformers writes no lm_head.weight, and one
    that is stored anyway must be the embedding (else the weights are not a tied model)."""
    if OUTPUT_LAYER.hf not in source.weight_map:
        return
    if not torch.equal(source.get(OUTPUT_LAYER.hf), source.get(EMBEDDING.hf)):
        raise ConfigError(
            f"'{source.dir}': config.json says tie_word_embeddings=true but "
            f"'{OUTPUT_LAYER.hf}' differs from '{EMBEDDING.hf}'"
        )


def model_yaml(model: ModelConfig, tokenizer_path: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": {name: getattr(model, name) for name in MODEL_YAML_FIELDS}}
    if tokenizer_path is not None:
        out["data"] = {"tokenizer_path": str(tokenizer_path)}
    return out


def tokenizer_forms(folder: Path, final_dir: Path) -> list[dict[str, Any]]:
    """Identities of the tokenizers the copied files in `folder` make, with their paths under
    `final_dir`: the SentencePiece tokenizer.model first (what model.yaml names, as before
    Hugging Face tokenizers were supported), then the folder's tokenizer.json. One that does
    not load is left out with a warning (the import does not need it)."""
    candidates = [
        (folder / SENTENCEPIECE_FILE, final_dir / SENTENCEPIECE_FILE),
        (folder, final_dir) if (folder / HF_FILE).is_file() else None,
    ]
    forms = []
    for candidate in candidates:
        if candidate is None or not candidate[0].exists():
            continue
        try:
            identity = load_tokenizer(candidate[0]).identity()
        except ConfigError as exc:
            log.warning("the tokenizer files are copied, but %s", exc)
            continue
        forms.append({**identity, "path": str(candidate[1])})
    return forms


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    max_tp: int = DEFAULT_MAX_TP,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert; returns the final output folder. Bad input raises ConfigError, leaving nothing.

    `dtype` "auto" keeps the dtype the checkpoint's tensors are stored in (`hf_io.source_dtype`);
    "fp32", "bf16" or "fp16" casts to it (and is model.yaml's params_dtype either way).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    wanted = None if dtype == "auto" else hf_io.params_dtype(dtype)
    if dtype != "auto" and wanted is None:
        choices = ["auto", *sorted(hf_io.TORCH_DTYPES)]
        raise ConfigError(f"--dtype: expected one of {choices}, got '{dtype}'")
    config = hf_io.read_hf_config(hf_dir)
    source = hf_io.HFTensorSource(hf_dir)  # checks that every shard the index names exists
    if wanted is None:  # --dtype auto
        wanted, note = hf_io.source_dtype(source, config)
        log.info(note)
    divisor, padded = stable_divisor(int(config["vocab_size"]), max_tp)
    _warn_padding_rows(int(config["vocab_size"]), padded, max_tp)
    model = hf_io.model_config_from_hf(config, wanted, divisor)
    shapes = shapes_of(model, int(config["vocab_size"]), padded)
    megatron_io.ensure_single_rank_world()
    with atomic_output_dir(out_dir, overwrite, inputs=[hf_dir]) as tmp:
        sharded = build_sharded_state(source, model, shapes, hf_io.TORCH_DTYPES[wanted], progress)
        source.close()
        root = RootConfig(model=model)
        hf_io.copy_tokenizer_files(hf_dir, tmp)
        hf_io.keep_tokenizer_class(hf_dir, tmp)
        forms = tokenizer_forms(tmp, out_dir)
        # The HF folder's own form, where the copy's class had to be named (keep_tokenizer_class).
        shas = {f["sha256"] for f in forms}
        forms += [f for f in tokenizer_forms(hf_dir, hf_dir.absolute()) if f["sha256"] not in shas]
        final_tokenizer = Path(forms[0]["path"]) if forms else None
        if final_tokenizer is not None:
            root.data.tokenizer_path = str(final_tokenizer)
        # Recorded in the manifest: exporting this checkpoint as it is claims no SoFT training.
        identity: dict[str, Any] = {IMPORTED_FROM_HF: str(hf_dir.absolute())}
        if forms:  # fine-tuning runs check they use this tokenizer (in any form it came in)
            identity["tokenizer"] = forms[0]
            identity["tokenizer_forms"] = forms[1:]
        save(tmp, [megatron_io.ModelOnly(sharded)], TrainState(), root, identity=identity)
        del sharded
        text = yaml.safe_dump(model_yaml(model, final_tokenizer), sort_keys=False)
        header = (
            f"# Converted from {hf_dir.absolute()} by tools/convert_hf_to_megatron.py.\n"
            f"# make_vocab_size_divisible_by={divisor}: the padded vocabulary ({padded} rows) is the\n"
            f"# same at every tensor-parallel size dividing {max_tp}, so the checkpoint loads at any.\n"
        )
        (tmp / "model.yaml").write_text(header + text)
    log.info(
        "wrote %s (%d layers, vocab %d padded to %d)",
        out_dir,
        model.num_layers,
        shapes.vocab,
        padded,
    )
    return out_dir


def _warn_padding_rows(vocab: int, padded: int, max_tp: int) -> None:
    """Padding rows are zero: their logit 0 joins every softmax (megatron's cross-entropy runs
    over the padded vocabulary), so losses are not transformers' until training pushes them
    down. Real vocabularies are multiples of 8 and get none; say how to avoid them."""
    if padded == vocab:
        return
    no_padding = max_tp
    while vocab % no_padding:
        no_padding //= 2
    log.warning(
        "vocabulary %d is padded to %d rows (the same at every TP size dividing "
        "--max-tensor-parallel %d): the %d zero padding rows join the softmax, so losses "
        "differ from transformers' until training pushes them down; --max-tensor-parallel %d "
        "imports without padding",
        vocab,
        padded,
        max_tp,
        padded - vocab,
        no_padding,
    )
