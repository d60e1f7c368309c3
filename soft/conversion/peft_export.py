"""Exporting an adapter run (peft.method=lora): merged into its base, or as a PEFT adapter.

An adapter checkpoint holds only what trained (soft.peft.base): per target module T of
`linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2` the stacked tensors
`decoder.layers.<owner>.<T>.lora.a` [n_adapted, r, in] and `... .lora.b` [n_adapted, out, r]
(the leading axis counts the adapted layers in order), and the final norm when
peft.train_final_norm. The base weights come from the base checkpoint its manifest names,
checked by checksum (`resolve_base`: a base that is gone or holds other weights is refused).

Merged (`soft-export` with no extra flag): `MergedReader` reads a layer's base tensors and
its adapters and returns W' = W + (alpha / r) B A, computed in fp32, in megatron's layout, so
the HF mapping (the qkv de-interleave, the fc1 gate/up split) applies to the merged W exactly
as to any weight; the export casts to the output dtype afterwards. Memory stays one layer.

PEFT (`soft-export --peft-adapter`): adapter_config.json + adapter_model.safetensors in
PEFT's own layout (checked against `get_peft_model(...).save_pretrained` of peft 0.21.2):
`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B
.weight` [out, r] per HF module. A fused megatron adapter is one adapter per HF module with
the SAME A and the rows of B that W's mapping gives that module: the q rows of qkv's output
are B_q A x, so the split is exact. A trained final norm is a whole tensor, not a low-rank
update: it goes in PEFT's `modules_to_save=["model.norm"]` (stored as
`base_model.model.model.norm.weight`; the plain name "norm" would also match every layer's
input_layernorm). With --exit-layer K only layers < K are written, so the adapter loads over
the K-layer export of the base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from soft.checkpointing.checkpoint import verify
from soft.checkpointing.directory import CheckpointError
from soft.checkpointing.manifest import read_manifest
from soft.checkpointing.partial_read import SliceRequests, read_slices
from soft.config.errors import ConfigError
from soft.config.root import RootConfig
from soft.conversion import hf_io, megatron_io
from soft.conversion.hf_to_megatron import IMPORTED_FROM_HF, shapes_of
from soft.conversion.mapping import FINAL_NORM, LAYER_ROWS, Row, Shapes
from soft.conversion.output import atomic_output_dir
from soft.peft.base import resolve_base, stored_reference
from soft.peft.config import OWNERS, PeftConfig

if TYPE_CHECKING:
    from soft.conversion.megatron_to_hf import ExportRequest

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT matches modules_to_save by name suffix: "model.norm" is the final norm only.
FINAL_NORM_MODULE = "model.norm"


def weight_row(target: str) -> Row:
    """The mapping row of target module `target`'s weight (its HF split)."""
    param = f"decoder.layers.*.{OWNERS[target]}.{target}.weight"
    return next(row for row in LAYER_ROWS if row.megatron == param)


def target_of(row: Row) -> str | None:
    """The LoRA target module whose weight `row` is, or None."""
    for target, owner in OWNERS.items():
        if row.megatron == f"decoder.layers.*.{owner}.{target}.weight":
            return target
    return None


def adapter_keys(target: str) -> tuple[str, str]:
    """Checkpoint keys of a target's stacked A and B (soft.peft.lora)."""
    stem = f"decoder.layers.{OWNERS[target]}.{target}.lora"
    return f"{stem}.a", f"{stem}.b"


def layer_shapes(cfg: RootConfig) -> Shapes:
    """The sizes a layer's rows split by (the vocabulary sizes play no part there)."""
    return shapes_of(cfg.model, 0, 0)


class AdapterCheckpoint:
    """The trained tensors of an adapter checkpoint, read one layer at a time."""

    def __init__(self, ckpt: Path, cfg: RootConfig) -> None:
        if not cfg.peft.enabled:
            raise ConfigError(
                f"checkpoint '{ckpt}' names a base checkpoint (peft_base in its manifest.json) "
                f"but its config.yaml has peft.method={cfg.peft.method}"
            )
        self.ckpt = ckpt
        self.peft: PeftConfig = cfg.peft
        self.reader = megatron_io.CheckpointReader(ckpt, cfg.model.num_layers)
        # 0-based layers in the order of the stacked axis (LoraAdapter.slot)
        self.adapted = [n - 1 for n in self.peft.adapted_layers(cfg.model.num_layers)]
        self._check_shapes(layer_shapes(cfg))
        if self.peft.train_final_norm and not self.holds(FINAL_NORM, None):
            raise CheckpointError(
                f"adapter checkpoint '{ckpt}' has peft.train_final_norm=true in its "
                f"config.yaml but no tensor '{FINAL_NORM.megatron}'"
            )

    @property
    def scale(self) -> float:
        return self.peft.scale

    def _check_shapes(self, shapes: Shapes) -> None:
        """Every target's A [n, r, in] and B [n, out, r] is there, as the config.yaml says."""
        n, r = len(self.adapted), self.peft.rank
        for target in self.peft.target_modules:
            out, inp = weight_row(target).megatron_shape(shapes)
            for key, want in zip(adapter_keys(target), ((n, r, inp), (n, out, r)), strict=True):
                meta = self.reader.metadata.get(key)
                if not isinstance(meta, TensorStorageMetadata):
                    raise CheckpointError(
                        f"adapter checkpoint '{self.ckpt}' has no tensor '{key}' (peft."
                        f"target_modules {self.peft.target_modules} in its config.yaml)"
                    )
                if tuple(meta.size) != want:
                    raise CheckpointError(
                        f"adapter checkpoint '{self.ckpt}': '{key}' has shape {tuple(meta.size)}, "
                        f"expected {want} from its config.yaml (peft.rank, peft.layers, model)"
                    )

    def slot(self, layer: int) -> int | None:
        """Index of 0-based `layer` along the adapters' layer axis (None: not adapted)."""
        return self.adapted.index(layer) if layer in self.adapted else None

    def dtype(self) -> torch.dtype:
        key, _ = adapter_keys(self.peft.target_modules[0])
        return self._tensor(key).properties.dtype

    def _tensor(self, key: str) -> TensorStorageMetadata:
        meta = self.reader.metadata[key]
        assert isinstance(meta, TensorStorageMetadata), key  # checked in _check_shapes
        return meta

    def pair(self, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of `target` in adapted 0-based `layer`, in fp32."""
        slot = self.slot(layer)
        if slot is None:
            raise ValueError(f"layer {layer} has no adapters")
        requests: SliceRequests = {}
        for key in adapter_keys(target):
            meta = self._tensor(key)
            buf = torch.empty((1, *meta.size[1:]), dtype=meta.properties.dtype)
            requests[key] = [((slot, 0, 0), buf)]
        read_slices(self.ckpt, requests)
        a, b = (requests[key][0][1][0].float() for key in adapter_keys(target))
        return a, b

    def holds(self, row: Row, layer: int | None) -> bool:
        """Whether the checkpoint holds this base tensor itself (a trained final norm)."""
        param = row.megatron.replace("*", str(layer)) if layer is not None else row.megatron
        return megatron_io.checkpoint_key(param)[0] in self.reader.metadata

    def final_norm(self, shapes: Shapes) -> torch.Tensor:
        """The trained final norm (peft.train_final_norm)."""
        return self.reader.read([(FINAL_NORM, None)], shapes)[FINAL_NORM.megatron]


class MergedReader:
    """megatron_io.CheckpointReader's interface over a base checkpoint and the adapters
    trained on it: adapted weights come back merged, W + s B A in fp32; what the adapter
    checkpoint holds itself (a trained final norm) comes from there."""

    def __init__(self, base: megatron_io.CheckpointReader, adapters: AdapterCheckpoint) -> None:
        self.base = base
        self.adapters = adapters
        self.metadata = base.metadata

    def dtype(self) -> torch.dtype:
        return self.base.dtype()

    def padded_vocab(self) -> int:
        return self.base.padded_vocab()

    def read(self, rows: list[tuple[Row, int | None]], shapes: Shapes) -> dict[str, torch.Tensor]:
        own = [(row, layer) for row, layer in rows if self.adapters.holds(row, layer)]
        rest = [pair for pair in rows if pair not in own]
        out = self.base.read(rest, shapes) if rest else {}
        if own:
            out.update(self.adapters.reader.read(own, shapes))
        for row, layer in rows:
            target = target_of(row)
            if layer is None or target is None or self.adapters.slot(layer) is None:
                continue
            if target not in self.adapters.peft.target_modules:
                continue
            a, b = self.adapters.pair(layer, target)
            name = row.megatron.replace("*", str(layer))
            out[name] = out[name].float() + self.adapters.scale * (b @ a)
        return out


AdapterRun = tuple[Path, AdapterCheckpoint]  # (base checkpoint, adapters)


def open_adapter_run(
    ckpt: Path, cfg: RootConfig, verify_base: bool, allow_unverified: bool
) -> AdapterRun | None:
    """(base checkpoint, adapters) of an adapter checkpoint; None for a full one. The base is
    checked against the checksum the run recorded and, with `verify_base` (its weights are
    read), file by file like any checkpoint."""
    reference = stored_reference(ckpt)
    if reference is None:
        return None
    base = resolve_base(ckpt, reference)
    if verify_base:
        verify(base, allow_unverified=allow_unverified)
    return base, AdapterCheckpoint(ckpt, cfg)


def export_peft_adapter(
    req: ExportRequest, ckpt: Path, cfg: RootConfig, num_layers: int, run: AdapterRun | None
) -> Path:
    """adapter_config.json + adapter_model.safetensors for layers < num_layers (module
    docstring); loads with peft.PeftModel.from_pretrained over the base's HF export."""
    if run is None:
        raise ConfigError(
            f"--peft-adapter: checkpoint '{ckpt}' holds full weights, not adapters (its "
            "manifest.json names no peft_base): export it without --peft-adapter"
        )
    base, adapters = run
    dtype = _adapter_dtype(req.dtype, adapters)
    written = [layer for layer in adapters.adapted if layer < num_layers]
    if not written:
        raise ConfigError(
            f"--exit-layer {num_layers}: peft.layers {adapters.peft.layers} adapts none of the "
            f"first {num_layers} layers, and PEFT refuses an adapter with no target module: "
            "export that sub-model merged (without --peft-adapter)"
        )
    tensors = adapter_tensors(adapters, written, layer_shapes(cfg), dtype)
    config = adapter_config(
        adapters.peft, written, num_layers, _base_name(req, base, cfg, num_layers)
    )
    with atomic_output_dir(
        Path(req.out_dir), req.overwrite, [req.checkpoint_dir, ckpt, base]
    ) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    log.info(
        "wrote PEFT adapter %s (layers %s of %d, %d tensors, base %s)",
        req.out_dir, [n + 1 for n in written], num_layers, len(tensors), base,
    )  # fmt: skip
    return Path(req.out_dir).absolute()


def _adapter_dtype(name: str, adapters: AdapterCheckpoint) -> torch.dtype:
    if name == "auto":
        return adapters.dtype()
    if name not in hf_io.TORCH_DTYPES:
        raise ConfigError(
            f"--dtype: expected auto or one of {sorted(hf_io.TORCH_DTYPES)}, got '{name}'"
        )
    return hf_io.TORCH_DTYPES[name]


def adapter_tensors(
    adapters: AdapterCheckpoint, layers: list[int], shapes: Shapes, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PEFT's state dict: per HF module the fused adapter's A and its module's rows of B."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        for target in adapters.peft.target_modules:
            a, b = adapters.pair(layer, target)
            row = weight_row(target)
            for name, b_rows in zip(row.hf_names(layer), row.to_hf(b, shapes), strict=True):
                module = PEFT_PREFIX + name.removesuffix(".weight")
                # Own copies: safetensors refuses tensors that share memory (A is reused).
                tensors[f"{module}.lora_A.weight"] = a.to(dtype).clone()
                tensors[f"{module}.lora_B.weight"] = b_rows.to(dtype).clone()
    if adapters.peft.train_final_norm:
        norm = adapters.final_norm(shapes)
        tensors[f"{PEFT_PREFIX}{FINAL_NORM.hf}"] = norm.to(dtype).clone()
    return tensors


def hf_targets(peft: PeftConfig) -> list[str]:
    """HF module names of the megatron targets (q_proj, k_proj, v_proj for linear_qkv, ...)."""
    names = [n for t in peft.target_modules for n in weight_row(t).hf_names(0)]
    return [n.removesuffix(".weight").rsplit(".", 1)[-1] for n in names]


def adapter_config(
    peft: PeftConfig, written: list[int], num_layers: int, base_name: str | None
) -> dict[str, Any]:
    """PEFT's LoraConfig fields (peft 0.21.2 fills the rest with its defaults). The scale
    alpha / r is PEFT's lora_alpha / r (use_rslora off)."""
    subset = peft.layers is not None and len(written) < num_layers
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": peft.rank,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "target_modules": hf_targets(peft),
        "layers_to_transform": written if subset else None,
        "modules_to_save": [FINAL_NORM_MODULE] if peft.train_final_norm else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _base_name(req: ExportRequest, base: Path, cfg: RootConfig, num_layers: int) -> str | None:
    """--base-model, else the HF folder the base was imported from when the adapter covers
    that whole model; else unknown (None): PeftModel.from_pretrained takes the base model
    object anyway."""
    if req.base_model:
        return req.base_model
    if num_layers != cfg.model.num_layers:
        return None
    return (read_manifest(base) or {}).get(IMPORTED_FROM_HF)
