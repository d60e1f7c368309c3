"""The Hugging Face side: config.json <-> ModelConfig (the supported families, everything else
refused by key), lazy tensor reading, sharded writing, and tokenizer files: a Hugging Face
tokenizer's own files carried along as they are, or for a SentencePiece model files that
`transformers.AutoTokenizer` loads with LLaMA-2's BOS convention."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soft.config.errors import ConfigError
from soft.conversion.mapping import CONFIG_PAIRS, FAMILIES, REFUSED_BECAUSE, Family
from soft.models.config import LLAMA3_ROPE_FIXED, ModelConfig, ParamsDtype

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor
    from tokenizers import Tokenizer as FastTokenizer
    from transformers import PretrainedConfig

TORCH_DTYPES: dict[ParamsDtype, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}  # fmt: skip
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# `--dtype auto`: the stored dtype's name; safetensors' names and torch's.
_STORED_NAMES: dict[str, ParamsDtype] = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}
_TORCH_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_KNOWN: tuple[ParamsDtype, ...] = ("fp32", "bf16", "fp16")


def params_dtype(name: str) -> ParamsDtype | None:
    """`name` as a params dtype; None when it is not one (the caller says which flag)."""
    return next((known for known in _KNOWN if known == name), None)


SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# config.json


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise ConfigError(f"--hf-dir '{hf_dir}' is not a directory")
    if not path.is_file():
        raise ConfigError(f"--hf-dir '{hf_dir}' has no config.json (expected a HF model folder)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"'{path}' is not valid JSON ({exc})") from exc
    check_supported(config, path)
    return config


# Keys that make a model one we do not build, whatever the family says (Mixture of Experts).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")


def family_of(config: dict[str, Any], path: Path) -> Family:
    """The family of a config.json, by model_type and architecture; anything else refused."""
    model_type, arch = config.get("model_type"), config.get("architectures") or []
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None or (arch and family.architecture not in arch):
        known = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
        raise ConfigError(
            f"'{path}': model_type={model_type!r}, architectures={arch!r}; supported families: "
            f"{known}. Mixture-of-experts and multimodal models are out of scope (README, "
            "'Which models')"
        )
    return family


def check_supported(config: dict[str, Any], path: Path) -> None:
    """Every config.json value our megatron model cannot express is refused up front, naming
    the key, its value and why (the family's `required` values, MoE keys, other activations,
    rope scaling other than llama3 with megatron-core's fixed values, sliding layers)."""
    family = family_of(config, path)
    found = (_problem(key, value, config) for key, value in family.required.items())
    problems = [p for p in found if p is not None]
    for key in _MOE_KEYS:
        if config.get(key):
            problems.append(f"{key}={config[key]!r}: Mixture-of-experts models are out of scope")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r}: SwiGLU needs 'silu'")
    sliding = [t for t in config.get("layer_types") or [] if t != "full_attention"]
    if sliding:
        problems.append(
            f"layer_types contains {sorted(set(sliding))}: {REFUSED_BECAUSE['sliding_window']}"
        )
    problems += rope_problems(config)
    if problems:
        raise ConfigError(
            f"'{path}': unsupported {family.model_type} model: " + "; ".join(problems)
        )


def _hf_default(model_type: str, key: str) -> Any:
    """What transformers assumes for a key config.json leaves out (MistralConfig: a 4096-token
    sliding window)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.for_model(model_type), key, None)


def _problem(key: str, required: Any, config: dict[str, Any]) -> str | None:
    if key in config:
        value, spelled = config[key], f"{key}={config[key]!r}"
    else:
        value = _hf_default(config["model_type"], key)
        spelled = f"{key} absent (transformers' default: {value!r})"
    if value == required:
        return None
    return f"{spelled}, expected {required!r}: {REFUSED_BECAUSE[key]}"


def rope_parameters(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(where the scaling was read: 'rope_scaling' or 'rope_parameters', its dict): the legacy
    top-level `rope_scaling` (transformers 4 configs, e.g. Llama-3.1's) or transformers 5's
    `rope_parameters` (which also holds rope_theta)."""
    if config.get("rope_scaling"):
        return "rope_scaling", dict(config["rope_scaling"])
    return "rope_parameters", dict(config.get("rope_parameters") or {})


def rope_type(config: dict[str, Any]) -> str:
    _, params = rope_parameters(config)
    return str(params.get("rope_type", params.get("type")) or "default")


def rope_problems(config: dict[str, Any]) -> list[str]:
    """Plain RoPE, or llama3 scaling with exactly megatron-core's fixed values."""
    where, params = rope_parameters(config)
    kind = rope_type(config)
    out = []
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        out.append(f"{where}.partial_rotary_factor != 1: only full-width RoPE is supported")
    if kind == "default":
        return out
    if kind != "llama3":
        return [
            *out,
            f"{where}.rope_type={kind!r}: only plain RoPE and 'llama3' scaling are supported "
            "(megatron-core's own RoPE scaling is Llama-3's)",
        ]
    if "factor" not in params:
        out.append(f"{where} has rope_type 'llama3' but no 'factor'")
    for key, fixed in LLAMA3_ROPE_FIXED.items():
        if key in params and float(params[key]) != float(fixed):
            out.append(
                f"{where}.{key}={params[key]!r}: megatron-core 0.16.1 applies llama3 RoPE "
                f"scaling with {key}={fixed} fixed (RotaryEmbedding._apply_scaling), so this "
                "model's frequencies would differ"
            )
    return out


def rope_theta(config: dict[str, Any]) -> float:
    """transformers 5 keeps rope_theta in rope_parameters; older configs at the top level."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_config_from_hf(config: dict[str, Any], dtype: ParamsDtype, divisor: int) -> ModelConfig:
    """ModelConfig of a checked config.json (read_hf_config): CONFIG_PAIRS, the family's fixed
    switches, RoPE base and scaling."""
    family = FAMILIES[config["model_type"]]
    values: dict[str, Any] = {}
    optional = {"num_key_value_heads", "head_dim", "tie_word_embeddings"}
    for ours, theirs in CONFIG_PAIRS:
        if theirs in config and config[theirs] is not None:
            values[ours] = config[theirs]
        elif theirs not in optional:
            raise ConfigError(f"config.json has no '{theirs}'")
    values["num_query_groups"] = values.get("num_query_groups") or config["num_attention_heads"]
    if values.get("head_dim") == config["hidden_size"] // config["num_attention_heads"]:
        values["head_dim"] = None  # the default: model.yaml says only what differs
    theta = rope_theta(config)
    if theta != int(theta):
        raise ConfigError(
            f"config.json rope_theta={theta} is not an integer (model.rotary_base is)"
        )
    _, params = rope_parameters(config)
    if rope_type(config) == "llama3":
        values.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]))
    values["norm_epsilon"] = float(values["norm_epsilon"])
    model = ModelConfig(
        **values,
        rotary_base=int(theta),
        qkv_bias=family.qkv_bias,
        qk_layernorm=family.qk_layernorm,
        family=family.model_type,
        params_dtype=dtype,
        make_vocab_size_divisible_by=divisor,
    )
    model.validate()
    return model


def export_family(model: ModelConfig) -> Family:
    """The family an export writes; an error when its architecture cannot express the model."""
    family = FAMILIES[model.family]
    for switch in ("qkv_bias", "qk_layernorm"):
        if getattr(model, switch) != getattr(family, switch):
            fits = [
                f.model_type
                for f in FAMILIES.values()
                if getattr(f, switch) == getattr(model, switch)
            ]
            raise ConfigError(
                f"config key 'model.family' is '{model.family}', whose {family.architecture} has "
                f"{switch}={getattr(family, switch)}, but 'model.{switch}' is "
                f"{getattr(model, switch)}: set model.family to one of {fits}"
            )
    return family


def hf_config_from_model(
    model: ModelConfig,
    vocab: int,
    num_layers: int,
    dtype: str,
    extra: dict[str, Any],
    tied: bool | None = None,
) -> PretrainedConfig:
    """The transformers config of `model`'s family (possibly truncated to `num_layers`), with
    `extra` attributes. `tied`: whether the export's LM head is the embedding (default: the
    model's; an ICT sub-model whose head is its own exit head is untied)."""
    from transformers import AutoConfig

    family = export_family(model)
    values = {theirs: getattr(model, ours) for ours, theirs in CONFIG_PAIRS}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=model.rope_scaling_factor, **LLAMA3_ROPE_FIXED)
    values.update(
        num_hidden_layers=num_layers,
        num_key_value_heads=model.query_groups,
        head_dim=model.kv_channels,
        vocab_size=vocab,
        tie_word_embeddings=model.tie_word_embeddings if tied is None else tied,
        rope_parameters=rope,
        hidden_act="silu",
        **family.required,
    )
    config = AutoConfig.for_model(family.model_type, **values, **extra)
    config.architectures = [family.architecture]
    config.dtype = HF_DTYPE_NAMES[dtype]
    return config


# ---------------------------------------------------------------------------------------------
# Reading weights lazily


class HFTensorSource:
    """Tensors of a HF folder by name, read one at a time (safetensors or .bin, index or not)."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = hf_dir
        self._open: dict[str, Any] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        for index in (SAFE_INDEX, BIN_INDEX):
            path = self.dir / index
            if path.is_file():
                try:
                    weight_map = json.loads(path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ConfigError(f"'{path}' is not a valid weight index ({exc})") from exc
                for file in sorted(set(weight_map.values())):
                    if not (self.dir / file).is_file():
                        raise ConfigError(
                            f"'{path}' names shard '{file}', which does not exist in '{self.dir}'"
                        )
                return weight_map
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.dir / single).is_file():
                return {name: single for name in self._names(single)}
        raise ConfigError(
            f"'{self.dir}' has no weights: expected model.safetensors, {SAFE_INDEX}, "
            f"pytorch_model.bin or {BIN_INDEX}"
        )

    def _handle(self, file: str) -> Any:
        if file not in self._open:
            path = self.dir / file
            try:
                if file.endswith(".safetensors"):
                    self._open[file] = safe_open(str(path), framework="pt")
                else:  # mmap: a .bin shard is paged in per tensor, not read whole
                    self._open[file] = torch.load(
                        path, map_location="cpu", mmap=True, weights_only=True
                    )
            except Exception as exc:
                raise ConfigError(f"cannot read weights file '{path}' ({exc})") from exc
        return self._open[file]

    def _names(self, file: str) -> list[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ConfigError(f"'{self.dir}': tensor '{name}' is missing from the checkpoint")
        handle = self._handle(file)
        return handle.get_tensor(name) if file.endswith(".safetensors") else handle[name]

    def dtype_names(self) -> dict[str, str]:
        """{tensor name: "fp32" | "bf16" | "fp16" | other stored name}, from the file headers
        (safetensors) or the mmap'd tensors (.bin): no tensor data is read."""
        out = {}
        for name, file in self.weight_map.items():
            handle = self._handle(file)
            if file.endswith(".safetensors"):
                stored = handle.get_slice(name).get_dtype()
                out[name] = _STORED_NAMES.get(stored, stored)
            else:
                dtype = handle[name].dtype
                out[name] = _TORCH_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        return out

    def close(self) -> None:
        self._open.clear()


def source_dtype(source: HFTensorSource, config: dict[str, Any]) -> tuple[ParamsDtype, str]:
    """`--dtype auto`: the dtype the checkpoint's tensors are stored in, and a note for the log.

    Like `torch_dtype="auto"` in transformers, but read from the tensors themselves (what the
    numbers are), not only config.json's `torch_dtype`/`dtype` (what someone wrote): LLaMA-2's
    released weights are fp16, and converting them to bf16 rounds every one. Mixed storage
    (fp32 norms beside fp16 matrices) becomes fp32, so nothing is rounded.
    """
    names = set(source.dtype_names().values())
    unknown = names - set(_KNOWN)
    if unknown:
        raise ConfigError(
            f"'{source.dir}' stores tensors as {sorted(unknown)}; --dtype auto handles fp32, "
            "bf16 and fp16: pass --dtype explicitly"
        )
    # One 16-bit type stays; fp32 anywhere, or fp16 beside bf16 (neither holds the other's
    # values exactly), is fp32.
    chosen = next(k for k in _KNOWN if k in names) if len(names) == 1 else "fp32"
    declared = config.get("dtype") or config.get("torch_dtype")
    note = f"--dtype auto: tensors stored as {'/'.join(sorted(names))} -> {chosen}"
    if isinstance(declared, str) and declared != HF_DTYPE_NAMES[chosen]:
        note += f" (config.json says {declared!r}; the stored tensors decide)"
    return chosen, note


# ---------------------------------------------------------------------------------------------
# Writing weights as we go


@dataclass
class _Shard:
    tensors: dict[str, torch.Tensor]
    nbytes: int = 0


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` as they arrive, then
    names them model-0000i-of-0000n.safetensors and writes HF's index (n is known only then)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_bytes = max_shard_bytes
        self.current = _Shard({})
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.current.tensors and self.current.nbytes + size > self.max_bytes:
            self._flush()
        self.current.tensors[name] = tensor.contiguous()
        self.current.nbytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.out_dir / f"shard-{len(self.written):05d}.tmp"
        save_file(self.current.tensors, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.current.tensors)))
        self.current = _Shard({})

    def finish(self) -> None:
        if self.current.tensors:
            self._flush()
        n = len(self.written)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files `src_dir` has (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, the chat template, tokenizer.model, ...: soft.data.tokenizer's
    TOKENIZER_FILES) byte for byte, so the copy has the same identity (unless the tokenizer's
    class came from the model's config.json: keep_tokenizer_class); returns their names."""
    from soft.data.tokenizer import TOKENIZER_FILES

    copied = [name for name in TOKENIZER_FILES if (src_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(src_dir / name, out_dir / name)
    return copied


def keep_tokenizer_class(src_dir: Path, copy_dir: Path) -> None:
    """Make the copied tokenizer files load as the HF folder's do. transformers picks the class
    from the model's config.json as well (model_type), which the copy has no longer: e.g. a
    qwen2 folder whose tokenizer_config.json names the generic backend loads as Qwen2Tokenizer,
    which splits digits. Where the classes differ, the copy's tokenizer_config.json names the
    source's class (checked by loading it again)."""
    from soft.data.tokenizer import HF_FILE

    config_file = copy_dir / "tokenizer_config.json"
    if not (src_dir / HF_FILE).is_file() or not config_file.is_file():
        return
    try:
        wanted = _hf_class_name(src_dir)
        if _hf_class_name(copy_dir) == wanted:
            return
    except ConfigError:
        return  # a tokenizer that does not load: tokenizer_forms warns, the import goes on
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = wanted
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    got = _hf_class_name(copy_dir)
    if got != wanted:
        raise ConfigError(
            f"the tokenizer in '{src_dir}' loads as {wanted} (chosen by its config.json), but a "
            f"copy without config.json loads as {got}: the import cannot carry it"
        )
    log.info("tokenizer_config.json of the import names %s, as %s loads it", wanted, src_dir)


def _hf_class_name(folder: Path) -> str:
    """The class AutoTokenizer loads a folder holding a tokenizer.json as."""
    from soft.data.tokenizer import HFTokenizer

    return HFTokenizer.load(folder, folder).class_name


def write_tokenizer(sp_model: Path, out_dir: Path, max_length: int) -> None:
    """tokenizer.model plus a tokenizer.json/tokenizer_config.json that reproduce SentencePiece.

    transformers 5 converts a bare tokenizer.model with its own Metaspace pre-tokenizer, which
    differs from SentencePiece on leading/repeated spaces. We write tokenizer.json ourselves in
    the layout of LLaMA-2's original HF tokenizer (Prepend "▁" + Replace " " -> "▁", BPE with
    byte fallback, merges ranked by the merged piece's score: SentencePiece's BPE order), a
    template post-processor that puts BOS first, and the generic fast tokenizer class so
    transformers uses the file as is.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokenizer = _fast_tokenizer(sp)
    shutil.copyfile(sp_model, out_dir / "tokenizer.model")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    piece = sp.id_to_piece
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _fast_tokenizer(sp: SentencePieceProcessor) -> FastTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    merges: list[tuple[str, str, float]] = []
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        local = sorted(
            ((a, b) for a, b in splits if a in vocab and b in vocab),
            key=lambda ab: (vocab[ab[0]], vocab[ab[1]]),
        )
        merges.extend((a, b, sp.get_score(i)) for a, b in local)
    merges.sort(key=lambda m: -m[2])  # stable: equal scores keep vocabulary order
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for a, b, _ in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    specials = [sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok
