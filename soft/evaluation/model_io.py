"""Loading exported Hugging Face folders (any supported family) and resolving which exits to use.

An ICT export (`soft_exit_heads: [k, ...]` in config.json) also has `exit_heads.safetensors`
with `exit_heads.<k>.norm.weight` [hidden] and `exit_heads.<k>.lm_head.weight` [vocab, hidden]
per listed early exit k: exit k's logits then come from its own head, not the shared one. The
names are those soft.conversion.mapping writes; they are spelled here too so that evaluation
does not import the megatron side.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from soft.config.errors import ConfigError
from soft.conversion.export_format import (  # torch-free names shared with the export
    EXIT_HEADS_FILE,
    EXIT_HEADS_KEY,
    EXIT_LAYERS_KEY,
    exit_head_names,
)
from soft.data.tokenizer import HF_FILE, SENTENCEPIECE_FILE, Tokenizer, load_tokenizer
from soft.evaluation.causal_lm import as_causal_lm

if TYPE_CHECKING:
    from soft.evaluation.causal_lm import CausalLM

# One exit's own head (ICT): RMSNorm, then a bias-free vocabulary projection.
ExitHead = tuple[nn.Module, nn.Module]

T = TypeVar("T")


@dataclass
class ExportedModel:
    """A loaded export: the HF model, its tokenizer, the exits recorded at training time and
    the ICT heads of early exits that have their own (empty: every exit uses the shared head)."""

    model: CausalLM
    tokenizer: Tokenizer
    recorded_exits: list[int] | None
    path: Path
    exit_heads: dict[int, ExitHead] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` = bfloat16 on GPU (LLaMA-2's training dtype), float32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"--dtype: expected auto or one of {sorted(table)}, got '{dtype}'")
    return table[dtype]


def read_model_config(model_dir: str | Path) -> dict:
    """The folder's config.json; a folder without one is most likely a megatron checkpoint."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model-dir '{model_dir}' is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(
            f"--model-dir '{model_dir}' has no config.json and is not a megatron checkpoint: "
            "pass an exported HF folder, a run's checkpoints folder or one iter_* folder"
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{config_path}' is not valid JSON ({exc})") from exc


def recorded_exit_layers(config: dict, source: str = "config.json") -> list[int] | None:
    """`soft_exit_layers` from a config dict, validated; None when the export has none."""
    exits = config.get(EXIT_LAYERS_KEY)
    if exits is None:
        return None
    num_layers = int(config["num_hidden_layers"])
    return validate_exits(exits, num_layers, f"{source} '{EXIT_LAYERS_KEY}'")


def validate_exits(exits: list[int], num_layers: int, where: str) -> list[int]:
    """Exits are 1-based layer counts in 1..num_layers; returned sorted and deduplicated."""
    if not isinstance(exits, list | tuple) or not exits:
        raise ConfigError(f"{where}: expected a non-empty list of layer counts, got {exits!r}")
    for k in exits:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_layers:
            raise ConfigError(
                f"{where}: exit {k!r} is outside the model's depth; expected integers in "
                f"1..{num_layers} (the model has {num_layers} layers)"
            )
    return sorted(set(exits))


def _parse_list(text: str, flag: str, cast: Callable[[str], T], noun: str) -> list[T]:
    """'12,16,32' -> [cast(12), ...]; anything else is a ConfigError naming the flag."""
    try:
        values = [cast(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ConfigError(f"{flag}: expected comma-separated {noun}s, got '{text}'") from exc
    if not values:
        raise ConfigError(f"{flag}: expected at least one {noun}, got '{text}'")
    return values


def parse_int_list(text: str, flag: str) -> list[int]:
    return _parse_list(text, flag, int, "integer")


def parse_float_list(text: str, flag: str) -> list[float]:
    return _parse_list(text, flag, float, "number")


def resolve_exits(
    requested: list[int] | None, exported: ExportedModel, flag: str = "--exits"
) -> list[int]:
    """Requested exits, else the trained ones from config.json, else every layer."""
    if requested is not None:
        return validate_exits(list(requested), exported.num_layers, flag)
    if exported.recorded_exits is not None:
        return list(exported.recorded_exits)
    return list(range(1, exported.num_layers + 1))


def _listed_heads(config: dict, path: Path) -> list[int]:
    """`soft_exit_heads`, checked: heads exist only for early exits 1..num_layers-1."""
    listed = config.get(EXIT_HEADS_KEY)
    num_layers = int(config["num_hidden_layers"])
    if not isinstance(listed, list) or not listed:
        raise ConfigError(
            f"'{path}': config.json '{EXIT_HEADS_KEY}' must be a non-empty list of exits, "
            f"got {listed!r}"
        )
    for k in listed:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_layers:
            raise ConfigError(
                f"'{path}': config.json '{EXIT_HEADS_KEY}' lists exit {k!r}; ICT heads exist only "
                f"for early exits 1..{num_layers - 1} (the model has {num_layers} layers)"
            )
    return sorted(set(listed))


def read_exit_heads(model_dir: Path, config: dict) -> dict[int, dict[str, torch.Tensor]]:
    """{k: {"norm": [hidden], "lm_head": [vocab, hidden]}} from exit_heads.safetensors, every
    tensor present with the model's shape and nothing else in the file; {} for a plain export."""
    path = model_dir / EXIT_HEADS_FILE
    if EXIT_HEADS_KEY not in config:
        if path.exists():
            raise ConfigError(
                f"'{path}' exists but config.json has no '{EXIT_HEADS_KEY}': which exits it "
                "serves is unknown (re-export the checkpoint)"
            )
        return {}
    heads = _listed_heads(config, path)
    if not path.is_file():
        raise ConfigError(f"'{path}' is missing (config.json lists ICT heads {heads})")
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise ConfigError(f"cannot read '{path}' ({exc})") from exc
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k in heads:
        norm, lm_head = exit_head_names(k)
        out[k] = {
            "norm": _head_tensor(stored, norm, (hidden,), path),
            "lm_head": _head_tensor(stored, lm_head, (vocab, hidden), path),
        }
    if stored:
        raise ConfigError(
            f"'{path}' has tensors for exits not listed in config.json '{EXIT_HEADS_KEY}' "
            f"{heads}: {sorted(stored)}"
        )
    return out


def _head_tensor(
    stored: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], path: Path
) -> torch.Tensor:
    """Pop `name` from the file's tensors, checking its shape against config.json."""
    if name not in stored:
        raise ConfigError(f"'{path}' has no tensor '{name}' (config.json lists its exit)")
    tensor = stored.pop(name)
    if tuple(tensor.shape) != shape:
        raise ConfigError(
            f"'{path}': tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape} "
            "from config.json"
        )
    return tensor


def build_exit_heads(
    model: CausalLM, tensors: dict[int, dict[str, torch.Tensor]]
) -> dict[int, ExitHead]:
    """Norm + head modules beside `model`'s own: same norm class, eps, dtype and device,
    inference mode."""
    config = model.config
    weight = model.lm_head.weight
    heads: dict[int, ExitHead] = {}
    place = {"device": weight.device, "dtype": weight.dtype}
    for k, pair in tensors.items():
        norm = type(model.model.norm)(config.hidden_size, eps=config.rms_norm_eps).to(**place)
        # Built in place: no fp32 CPU copy of a vocabulary-sized matrix per head.
        lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **place)
        with torch.no_grad():
            norm.weight.copy_(pair.pop("norm"))
            lm_head.weight.copy_(pair.pop("lm_head"))
        heads[k] = (norm.eval().requires_grad_(False), lm_head.eval().requires_grad_(False))
    return heads


def _is_megatron_checkpoint(path: Path) -> bool:
    from soft.checkpointing.directory import find_checkpoint

    return path.is_dir() and find_checkpoint(path) is not None


def _export_checkpoint(checkpoint: Path, out_dir: Path) -> Path:
    from soft.conversion.megatron_to_hf import ExportRequest, convert_megatron_to_hf

    return convert_megatron_to_hf(
        ExportRequest(checkpoint_dir=checkpoint, out_dir=out_dir, dtype="fp32", progress=False)
    )


def load_model_tokenizer(model_dir: Path) -> Tokenizer:
    """The folder's own tokenizer, by the rule data.tokenizer_path follows for a folder
    (tokenizer.json: Hugging Face; else tokenizer.model: SentencePiece)."""
    if not (model_dir / HF_FILE).is_file() and not (model_dir / SENTENCEPIECE_FILE).is_file():
        raise ConfigError(
            f"--model-dir '{model_dir}' has no tokenizer: expected {HF_FILE} (with "
            f"tokenizer_config.json) or {SENTENCEPIECE_FILE}"
        )
    return load_tokenizer(model_dir)


def load_exported_model(
    model_dir: str | Path, device: str = "auto", dtype: str = "auto"
) -> ExportedModel:
    """Load an exported HF folder of any supported family (config.json + safetensors + its
    tokenizer, + exit_heads.safetensors for ICT), or a megatron checkpoint of a training run,
    converted on the fly to a temporary HF folder by the conversion code (the same export
    `tools/convert_megatron_to_hf.py` writes)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and _is_megatron_checkpoint(model_dir):
        with tempfile.TemporaryDirectory(prefix="soft-eval-export-") as tmp:
            exported_dir = _export_checkpoint(model_dir, Path(tmp) / "hf")
            loaded = load_exported_model(exported_dir, device=device, dtype=dtype)
            loaded.path = model_dir
            return loaded
    config = read_model_config(model_dir)
    exits = recorded_exit_layers(config, f"'{model_dir / 'config.json'}'")
    head_tensors = read_exit_heads(model_dir, config)  # checked before the (big) model loads
    tokenizer = load_model_tokenizer(model_dir)
    torch_device = pick_device(device)
    # sdpa: our layer driver builds explicit additive masks, which eager and sdpa both accept
    # (flash-attention kernels take no 4-D masks).
    model = as_causal_lm(
        AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=pick_dtype(dtype, torch_device), attn_implementation="sdpa"
        ),
        model_dir,
    )
    # transformers wraps PreTrainedModel.to in a decorator typed as functools._Wrapped, which
    # mypy does not bind to the instance: it reads the device as the `self` argument.
    model.to(torch_device).eval()  # type: ignore[arg-type]
    return ExportedModel(
        model=model,
        tokenizer=tokenizer,
        recorded_exits=exits,
        path=model_dir,
        exit_heads=build_exit_heads(model, head_tensors),
    )
