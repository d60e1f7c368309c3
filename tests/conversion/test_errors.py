"""Bad input fails with an InputError that says what is wrong, and leaves no output behind."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from soft.config.errors import InputError
from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf
from tests.conversion.helpers import BUILTIN_TOKENIZER, make_hf_model, make_ict_checkpoint


@pytest.fixture
def hf_dir(tmp_path):
    make_hf_model(tmp_path / "hf", layers=2, max_shard_size="20KB")
    return tmp_path / "hf"


def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _convert_fails(hf_dir, out, match: str) -> None:
    with pytest.raises(InputError, match=match):
        convert_hf_to_megatron(hf_dir, out, dtype="fp32", progress=False)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize(
    ("model_type", "arch"),
    [("gemma", "GemmaForCausalLM"), ("mixtral", "MixtralForCausalLM"),
     ("qwen2_moe", "Qwen2MoeForCausalLM"), ("llama", "MistralForCausalLM")],
)  # fmt: skip
def test_an_unsupported_family(hf_dir, tmp_path, model_type, arch):
    _edit_config(hf_dir, model_type=model_type, architectures=[arch])
    _convert_fails(
        hf_dir,
        tmp_path / "out",
        rf"model_type='{model_type}', architectures=\['{arch}'\]; supported families: llama "
        r"\(LlamaForCausalLM\), mistral .* Mixture-of-experts and multimodal models are out of scope",
    )


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
# (config.json changes, what the error says): the key, the value and why
UNSUPPORTED = {
    "linear rope": (
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        r"rope_scaling.rope_type='linear': only plain RoPE and 'llama3' scaling",
    ),
    "llama3 rope, other low factor": (
        {"rope_scaling": {**LLAMA3_ROPE, "low_freq_factor": 2.0}},
        r"rope_scaling.low_freq_factor=2.0: megatron-core 0.16.1 applies llama3 RoPE scaling "
        r"with low_freq_factor=1.0 fixed",
    ),
    "llama3 rope, other context (transformers 5 spelling)": (
        {
            "rope_parameters": {
                **LLAMA3_ROPE,
                "rope_theta": 5e5,
                "original_max_position_embeddings": 4096,
            }
        },
        r"rope_parameters.original_max_position_embeddings=4096: .* fixed",
    ),  # fmt: skip
    "partial rope": (
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "partial_rotary_factor": 0.5,
            }
        },
        r"partial_rotary_factor != 1",
    ),
    "llama attention bias": (
        {"attention_bias": True},
        r"attention_bias=True, expected False: it puts biases on q, k, v AND o_proj",
    ),
    "llama mlp bias": ({"mlp_bias": True}, r"mlp_bias=True, expected False: MLP biases"),
    "moe": ({"num_local_experts": 8}, r"num_local_experts=8: Mixture-of-experts"),
    "activation": ({"hidden_act": "gelu"}, r"hidden_act='gelu': SwiGLU needs 'silu'"),
    "sliding layers": (
        {"layer_types": ["full_attention", "sliding_attention"]},
        r"layer_types contains \['sliding_attention'\]: sliding-window attention is out of scope",
    ),
    "mistral v0.1 window": (
        {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096},
        r"unsupported mistral model: sliding_window=4096, expected None: sliding-window",
    ),
    "mistral window by default": (
        {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
        r"sliding_window absent \(transformers' default: 4096\), expected None",
    ),
    "qwen2 window": (
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
        r"use_sliding_window=True, expected False: sliding-window attention is out of scope",
    ),
    "qwen3 bias": (
        {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "attention_bias": True},
        r"unsupported qwen3 model: attention_bias=True, expected False",
    ),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_values_name_the_key_and_why(hf_dir, tmp_path, case):
    changes, message = UNSUPPORTED[case]
    _edit_config(hf_dir, **changes)
    _convert_fails(hf_dir, tmp_path / "out", message)


def test_a_tied_model_whose_lm_head_differs(tmp_path):
    """tie_word_embeddings=true with a stored lm_head.weight that is not the embedding."""
    make_hf_model(tmp_path / "hf", layers=2)
    _edit_config(tmp_path / "hf", tie_word_embeddings=True)
    _convert_fails(
        tmp_path / "hf",
        tmp_path / "out",
        r"tie_word_embeddings=true but 'lm_head.weight' differs from 'model.embed_tokens.weight'",
    )


def test_an_export_family_that_cannot_express_the_model():
    from soft.conversion.hf_io import export_family
    from soft.models.config import ModelConfig

    with pytest.raises(InputError, match=r"'model.family' is 'llama', whose LlamaForCausalLM "
                       r"has qkv_bias=False, but 'model.qkv_bias' is True: set model.family "
                       r"to one of \['qwen2'\]"):  # fmt: skip
        export_family(ModelConfig(qkv_bias=True))
    assert export_family(ModelConfig(qk_layernorm=True, family="qwen3")).model_type == "qwen3"


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    _convert_fails(tmp_path / "empty", tmp_path / "out", "has no config.json")


def test_index_names_a_missing_shard(hf_dir, tmp_path):
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    _convert_fails(hf_dir, tmp_path / "out", f"names shard '{shard.name}', which does not exist")


def test_tensor_missing_from_shards(hf_dir, tmp_path):
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    _convert_fails(hf_dir, tmp_path / "out", "'model.layers.1.mlp.up_proj.weight' is missing")


def test_shape_mismatch(hf_dir, tmp_path):
    """A shard whose tensor disagrees with config.json fails late: the half-written output goes."""
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    file = hf_dir / index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    tensors = load_file(file)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(24, 48)
    save_file(tensors, str(file), metadata={"format": "pt"})
    _convert_fails(
        hf_dir, tmp_path / "out", r"k_proj.weight' has shape \(24, 48\), expected \(16, 48\)"
    )


def test_existing_output_is_not_overwritten(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out", progress=False)


@pytest.mark.parametrize("k", [0, 3, -1])
def test_exit_layer_out_of_range(hf_dir, tmp_path, k):
    meg = convert_hf_to_megatron(hf_dir, tmp_path / "meg", dtype="fp32", progress=False)
    out = tmp_path / "hf_out"
    with pytest.raises(InputError, match=rf"--exit-layer {k} is outside 1..2"):
        convert_megatron_to_hf(ExportRequest(meg, out, exit_layer=k, tokenizer=BUILTIN_TOKENIZER))
    assert not out.exists() and not out.with_name("hf_out.tmp").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="is not a checkpoint"):
        convert_megatron_to_hf(ExportRequest(tmp_path, tmp_path / "out"))


def test_ict_checkpoint_without_a_head(hf_dir, tmp_path):
    """soft.mode=ict promises one head per early exit: a missing one fails before any output."""
    key = "exit_heads.1.output_layer.weight"
    make_ict_checkpoint(hf_dir, tmp_path / "meg", [1, 2], skip=key)
    out = tmp_path / "hf_out"
    with pytest.raises(
        InputError, match=rf"checkpoint '.*iter_0000000' \(soft.mode=ict\) has no tensor '{key}'"
    ):
        convert_megatron_to_hf(ExportRequest(tmp_path / "meg", out, progress=False))
    assert not out.exists() and not out.with_name("hf_out.tmp").exists()


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_overwrite_never_deletes_the_tools_own_input(hf_dir, tmp_path, where):
    """--overwrite replaces the output folder; an output that is, lies inside or contains the
    input would delete what the tool reads."""
    meg = convert_hf_to_megatron(hf_dir, tmp_path / "meg", dtype="fp32", progress=False)
    before = sorted(p.name for p in meg.rglob("*"))
    out = {"is": meg, "inside": meg / "hf_out", "contains": tmp_path}[where]
    with pytest.raises(InputError, match="overlaps the input"):
        convert_megatron_to_hf(ExportRequest(meg, out, overwrite=True, progress=False))
    assert sorted(p.name for p in meg.rglob("*")) == before
    with pytest.raises(InputError, match="overlaps the input"):
        convert_hf_to_megatron(hf_dir, hf_dir / "meg", overwrite=True, progress=False)
    assert (hf_dir / "config.json").is_file()


def test_a_damaged_checkpoint_is_not_exported(hf_dir, tmp_path):
    meg = convert_hf_to_megatron(hf_dir, tmp_path / "meg", dtype="fp32", progress=False)
    shard = max((meg / "iter_0000000").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)
    shard.write_bytes(data)
    with pytest.raises(InputError, match=f"{shard.name}' does not match its sha256"):
        convert_megatron_to_hf(ExportRequest(meg, tmp_path / "hf_out", progress=False))
    assert not (tmp_path / "hf_out").exists()


def test_fine_tuning_an_import_takes_its_model_shape_and_refuses_another_vocabulary(
    hf_dir, tmp_path
):
    """Without model.yaml the model's shape comes from the import's checkpoint (as Megatron's
    --use-checkpoint-args): hidden 48, 2 layers, 2 query groups, vocabulary 300. The run's
    tokenizer (the built-in 512 pieces) does not fit it: refused with the key named, never
    read as the first rows of a larger table (tests/checkpointing/test_requests.py checks the
    stored-shape guard that catches the same without a saved config)."""
    from soft.training.run import setup
    from tests.megatron_env import single_rank_world, tiny_config

    single_rank_world()
    meg = convert_hf_to_megatron(hf_dir, tmp_path / "meg", dtype="fp32", progress=False)
    cfg = tiny_config(
        f"checkpoint.load_dir={meg}",
        "checkpoint.finetune=true",
        f"train.output_dir={tmp_path / 'run'}",
    )
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.query_groups) == (48, 2, 2)
    with pytest.raises(
        InputError, match=r"'model.vocab_size' \(300\) is smaller.*set data.tokenizer_path"
    ):
        setup(cfg)
    assert not (tmp_path / "run").exists()
    explicit = tiny_config(
        f"checkpoint.load_dir={meg}", "checkpoint.finetune=true", "model.hidden_size=60"
    )
    assert explicit.model.hidden_size == 60  # what the user sets wins (and is then refused)
