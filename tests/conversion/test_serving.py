"""A sub-model export as vLLM's draft model for the full export: the config fields vLLM reads
and checks (vLLM itself is a GPU serving stack, not installed here)."""

from __future__ import annotations

import json

from transformers import AutoConfig, AutoTokenizer

from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf
from soft.conversion.serving import draft_problems
from tests.conversion.helpers import BUILTIN_TOKENIZER, make_hf_model


def _exports(tmp_path, vocab=512):
    make_hf_model(tmp_path / "hf", vocab=vocab, layers=4, heads=4, kv_heads=2, hidden=64,
                  tokenizer=BUILTIN_TOKENIZER)  # fmt: skip
    meg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    full = convert_megatron_to_hf(ExportRequest(meg, tmp_path / "full", progress=False))
    draft = convert_megatron_to_hf(
        ExportRequest(meg, tmp_path / "exit1", exit_layer=1, progress=False)
    )
    return full, draft


def test_exit_export_is_a_valid_vllm_draft_for_the_full_export(tmp_path):
    full, draft = _exports(tmp_path)
    assert draft_problems(full, draft) == []
    assert draft_problems(full, draft, tensor_parallel=2) == []  # 4 heads, 2 KV heads
    assert draft_problems(full, draft, tensor_parallel=4) == [
        "draft num_key_value_heads=2 is not divisible by tensor parallel 4"
    ]
    # What vLLM reads through transformers: the same vocabulary, architecture and context.
    target_cfg, draft_cfg = AutoConfig.from_pretrained(full), AutoConfig.from_pretrained(draft)
    assert draft_cfg.architectures == target_cfg.architectures == ["LlamaForCausalLM"]
    assert draft_cfg.get_text_config().vocab_size == target_cfg.get_text_config().vocab_size
    assert draft_cfg.max_position_embeddings == target_cfg.max_position_embeddings
    assert (draft_cfg.num_hidden_layers, target_cfg.num_hidden_layers) == (1, 4)
    text = "Answer the following question.\nQuestion: 2+2?\nAnswer: 4"
    assert (
        AutoTokenizer.from_pretrained(draft)(text)["input_ids"]
        == AutoTokenizer.from_pretrained(full)(text)["input_ids"]
    )
    # The wrong way round, and a foreign tokenizer, are refused with the reason.
    assert any("must be shallower" in p for p in draft_problems(draft, full))
    config = json.loads((draft / "config.json").read_text())
    config["vocab_size"] = 640
    (draft / "config.json").write_text(json.dumps(config))
    assert "vocab_size: target 512, draft 640" in draft_problems(full, draft)


def test_a_family_exit_export_drafts_for_its_full_export(tmp_path):
    """Qwen2 with q/k/v biases and a tied head: the exit-1 export is a valid draft too."""
    from tests.conversion.helpers import make_family_model

    make_family_model(
        tmp_path / "hf", "qwen2_tied", vocab=512, layers=3, tokenizer=BUILTIN_TOKENIZER
    )
    meg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    full = convert_megatron_to_hf(ExportRequest(meg, tmp_path / "full", progress=False))
    draft = convert_megatron_to_hf(
        ExportRequest(meg, tmp_path / "exit1", exit_layer=1, progress=False)
    )
    assert draft_problems(full, draft, tensor_parallel=2) == []
    assert json.loads((draft / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
