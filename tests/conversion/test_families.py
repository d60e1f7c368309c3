"""Every supported family (LLaMA-3 with RoPE scaling, LLaMA-3.2 tied, Mistral v0.3, Qwen2 with
q/k/v biases and tied, Qwen3 with q/k norms and a head_dim != hidden/heads), as a tiny random
HF model with odd sizes and grouped-query attention, against transformers:

- the import's per-exit logits equal transformers' (the first k layers + final norm + head,
  from output_hidden_states) at one rank; TP2xPP2 in tests/parallel/multirank.py
  (`families_tp2_pp2`);
- the export back is bit-exact, tensor for tensor (no lm_head when tied), with the family's
  model_type and architecture, and loads in transformers with no missing or unexpected key;
- an `--exit-layer k` export loads in transformers and gives exit k's logits;
- lossless self-speculative decoding on the export (tools/generate.py) equals greedy.

Tolerance (fp32, CPU): as tests/conversion/test_hf_to_megatron.py, atol 2e-5 + rtol 1e-5: the
implementations differ only in summation order (fused QKV and its bias, baddbmm vs sdpa,
RMSNorm op order); RoPE frequencies are bit-identical (tests/models/test_rope_scaling.py).
A mapping error (a bias in the wrong query group, q/k norms swapped, an untied head read as
tied) moves logits by O(1).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf
from soft.conversion.mapping import FAMILIES
from soft.conversion.tiny import FAMILY_MODELS
from tests.conversion.helpers import (
    BUILTIN_TOKENIZER,
    hf_logits_and_exits,
    make_family_model,
    megatron_logits_and_exits,
    megatron_reference,
)

TOL = {"atol": 2e-5, "rtol": 1e-5}


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))


def _head_dim(config) -> int:
    """Qwen2Config has no head_dim attribute (Qwen2Attention falls back to hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _all_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def family(request, tmp_path_factory):
    """name, the HF model, its folder and its import."""
    root = tmp_path_factory.mktemp(request.param)
    hf = make_family_model(root / "hf", request.param)
    meg = convert_hf_to_megatron(root / "hf", root / "meg", dtype="fp32", progress=False)
    return request.param, hf, root, meg


def test_import_switches_the_familys_features_on(family):
    from soft.config.root import load_config

    name, hf, _, meg = family
    model = load_config(meg / "model.yaml").model
    config = hf.config
    assert model.family == config.model_type
    assert model.qkv_bias == (config.model_type == "qwen2")
    assert model.qk_layernorm == (config.model_type == "qwen3")
    assert model.tie_word_embeddings == config.tie_word_embeddings
    assert model.kv_channels == _head_dim(config)
    assert model.head_dim == (None if _head_dim(config) * 4 == 40 else _head_dim(config))
    rope = config.rope_parameters
    assert model.rotary_base == rope["rope_theta"]
    assert model.rope_scaling == ("llama3" if rope["rope_type"] == "llama3" else "none")
    if model.rope_scaling == "llama3":
        assert model.rope_scaling_factor == rope["factor"]


def test_every_exit_matches_transformers(family):
    name, hf, _, meg = family
    gpt, vocab = megatron_reference(meg, meg / "model.yaml")
    hf_logits, hf_exits = hf_logits_and_exits(hf, _tokens(vocab))
    logits, exits = megatron_logits_and_exits(gpt, _tokens(vocab), vocab)
    torch.testing.assert_close(logits, hf_logits, **TOL)
    assert sorted(exits) == sorted(hf_exits) == [1, 2, 3]
    for k in hf_exits:
        torch.testing.assert_close(
            exits[k], hf_exits[k], **TOL, msg=lambda m, k=k: f"exit {k}: {m}"
        )


def test_export_is_bit_exact_and_loads_as_its_family(family):
    from transformers import AutoModelForCausalLM

    name, hf, root, meg = family
    back = root / "back"
    if not back.exists():
        request = ExportRequest(meg, back, tokenizer=BUILTIN_TOKENIZER, progress=False)
        convert_megatron_to_hf(request)
    original, exported = _all_tensors(root / "hf"), _all_tensors(back)
    assert set(exported) == set(original)
    assert ("lm_head.weight" in exported) == (not hf.config.tie_word_embeddings)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    config = json.loads((back / "config.json").read_text())
    family_ = FAMILIES[hf.config.model_type]
    assert config["model_type"] == family_.model_type
    assert config["architectures"] == [family_.architecture]
    loaded, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert type(loaded) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert _head_dim(loaded.config) == _head_dim(hf.config)
    for key in ("tie_word_embeddings", "rope_parameters", "num_key_value_heads"):
        assert getattr(loaded.config, key) == getattr(hf.config, key), key
    with torch.no_grad():
        tokens = _tokens(hf.config.vocab_size)
        assert torch.equal(loaded.eval()(tokens).logits, hf(tokens).logits)


def test_exit_export_equals_exit_k(family):
    from transformers import AutoModelForCausalLM

    name, hf, root, meg = family
    sub = root / "exit2"
    convert_megatron_to_hf(
        ExportRequest(meg, sub, exit_layer=2, tokenizer=BUILTIN_TOKENIZER, progress=False)
    )
    model, info = AutoModelForCausalLM.from_pretrained(sub, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert model.config.num_hidden_layers == 2 and type(model) is type(hf)
    tokens = _tokens(hf.config.vocab_size)
    _, hf_exits = hf_logits_and_exits(hf, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens).logits, hf_exits[2], **TOL)


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_speculative_decoding_on_the_export_equals_greedy(tmp_path, name, capsys):
    """tools/generate.py on an export of each family: self-speculative decoding with exit 1
    as the draft returns the full model's greedy tokens (the built-in tokenizer's 512 pieces:
    the model's vocabulary matches it so every generated id decodes)."""
    from soft.evaluation import cli_generate as generate

    make_family_model(tmp_path / "hf", name, vocab=512, layers=4, seed=7)
    meg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    export = tmp_path / "export"
    convert_megatron_to_hf(ExportRequest(meg, export, tokenizer=BUILTIN_TOKENIZER, progress=False))
    results = {}
    base = ["--model-dir", str(export), "--prompt", "add 3 and 4", "--max-new-tokens", "10"]
    for mode in (["--mode", "full"], ["--mode", "speculative", "--draft-exit", "1"]):
        assert generate.main([*base, *mode, "--num-draft", "3", "--json"]) == 0
        results[mode[1]] = json.loads(capsys.readouterr().out)
    assert results["speculative"]["token_ids"] == results["full"]["token_ids"]
    assert len(results["full"]["token_ids"]) > 0


def test_an_ict_sub_model_of_a_tied_model_is_untied(tmp_path):
    """soft.mode=ict gives exit k its own head; the k-layer export's head IS that head, so it
    is written as lm_head with tie_word_embeddings false, while the full export stays tied."""
    from transformers import AutoModelForCausalLM

    from tests.conversion.helpers import make_ict_checkpoint

    make_family_model(tmp_path / "hf", "qwen2_tied")
    heads = make_ict_checkpoint(tmp_path / "hf", tmp_path / "ict", [1, 3])
    for k, out in ((1, tmp_path / "exit1"), (None, tmp_path / "full")):
        convert_megatron_to_hf(ExportRequest(tmp_path / "ict", out, exit_layer=k, progress=False))
    sub, info = AutoModelForCausalLM.from_pretrained(tmp_path / "exit1", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert sub.config.tie_word_embeddings is False
    tensors = _all_tensors(tmp_path / "exit1")
    ict_head = heads["exit_heads.1.output_layer.weight"][: sub.config.vocab_size]
    assert torch.equal(tensors["lm_head.weight"], ict_head)
    assert torch.equal(tensors["model.norm.weight"], heads["exit_heads.1.final_layernorm.weight"])
    assert json.loads((tmp_path / "full" / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in _all_tensors(tmp_path / "full")


def test_evaluation_views_of_every_family_give_exit_k(family):
    """eval_exits' batched generation runs sub-model k as a view of the loaded model of the
    model's own class (soft.evaluation.batched.SubModels): its logits are exit k's."""
    from soft.evaluation.batched import SubModels

    name, hf, _, _ = family
    tokens = _tokens(hf.config.vocab_size)
    _, hf_exits = hf_logits_and_exits(hf, tokens)
    views = SubModels(hf)
    with torch.no_grad():
        for k in (1, 2):
            assert type(views(k)) is type(hf)
            torch.testing.assert_close(views(k)(tokens).logits, hf_exits[k], rtol=0, atol=0)


# config.json as the released models were saved (transformers 4): rope_theta and rope_scaling
# at the top level (Llama-3.1), and Qwen2.5's inactive sliding-window keys.
LEGACY = {
    "llama3": {
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
    },
    "qwen2_tied": {
        "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 21,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", LEGACY)
def test_released_config_layouts_import(tmp_path, name):
    """The same weights under a transformers-4 config.json: the import reads it to the same
    model, and its logits still equal transformers' (which reads that layout too)."""
    from transformers import AutoModelForCausalLM

    make_family_model(tmp_path / "hf", name)
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")
    config.pop("layer_types", None)
    path.write_text(json.dumps({**config, **LEGACY[name]}))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    meg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    gpt, vocab = megatron_reference(meg, meg / "model.yaml")
    logits, exits = megatron_logits_and_exits(gpt, _tokens(vocab), vocab)
    hf_logits, hf_exits = hf_logits_and_exits(hf, _tokens(vocab))
    for k in hf_exits:
        torch.testing.assert_close(exits[k], hf_exits[k], **TOL)
    assert gpt.rotary_scaling == (name == "llama3")  # read from the top-level rope_scaling
