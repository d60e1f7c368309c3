"""HF -> megatron against transformers: logits, every exit, the exact checkpoint layout, and the
bit-exact round trip back to HF.

Tolerance (fp32, CPU): the two implementations differ only in summation order (fused QKV matmul
vs three matmuls, megatron's baddbmm attention vs HF's sdpa, RMSNorm op order), which moves
logits of magnitude ~4 by ~3e-6; we allow atol 2e-5 + rtol 1e-5. A mapping error (swapped norms,
wrong QKV grouping, a RoPE permutation) changes them by O(1).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf
from tests.conversion.helpers import (
    BUILTIN_TOKENIZER,
    hf_logits_and_exits,
    make_hf_model,
    megatron_logits_and_exits,
    megatron_reference,
)

TOL = {"atol": 2e-5, "rtol": 1e-5}
VARIANTS = {
    "multi-head": {"kv_heads": 6, "layers": 3},
    "gqa-2-groups": {"kv_heads": 2, "layers": 4},
    "gqa-3-groups": {"kv_heads": 3, "layers": 3},
}


def _tokens(vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_logits_and_every_exit_match_transformers(tmp_path, variant):
    hf = make_hf_model(tmp_path / "hf", **VARIANTS[variant])
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    gpt, vocab = megatron_reference(out, out / "model.yaml")
    hf_logits, hf_exits = hf_logits_and_exits(hf, _tokens())
    logits, exits = megatron_logits_and_exits(gpt, _tokens(), vocab)
    torch.testing.assert_close(logits, hf_logits, **TOL)
    assert sorted(exits) == sorted(hf_exits) == list(range(1, hf.config.num_hidden_layers + 1))
    for k in hf_exits:
        torch.testing.assert_close(exits[k], hf_exits[k], **TOL, msg=f"exit {k}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact(tmp_path, variant):
    # A sharded input with an index exercises the multi-file reader; tiny output shards the writer.
    make_hf_model(tmp_path / "hf", max_shard_size="20KB", **VARIANTS[variant])
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    request = ExportRequest(
        tmp_path / "meg",
        tmp_path / "back",
        tokenizer=BUILTIN_TOKENIZER,
        max_shard_bytes=30_000,
        progress=False,
    )
    convert_megatron_to_hf(request)
    original, back = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "back")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # Never trained with SoFT: the export claims no exit plan (no soft_* keys at all).
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert not [k for k in config if k.startswith("soft_")], config
    # Files others can read, like any HF download (the umask decides, as for `cp`).
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "back").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))


def _all_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_checkpoint_layout_equals_a_built_models_sharded_state_dict(tmp_path):
    """Keys, global shapes and dtypes (layer = prepended axis, TE key names) match megatron's own."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    make_hf_model(tmp_path / "hf", kv_heads=2, layers=3)
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="bf16", progress=False)
    gpt, _ = megatron_reference(out, out / "model.yaml")
    expected: dict[str, tuple] = {}
    objects: set[str] = set()
    for item in gpt.sharded_state_dict().values():
        for sh in item.build() if isinstance(item, ShardedTensorFactory) else [item]:
            if isinstance(sh, ShardedObject):
                objects.add(sh.key)
            else:
                expected[sh.key] = (tuple(sh.global_shape), sh.dtype)
    meta = dcp.FileSystemReader(str(out / "iter_0000000")).read_metadata().state_dict_metadata
    stored = {k: (tuple(m.size), m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
    assert {k: v for k, v in stored.items() if k in expected} == expected
    assert set(expected) <= set(stored)
    assert all(any(k.startswith(obj) for k in meta) for obj in objects)


def test_vocab_padding_is_the_same_at_every_tp_size(tmp_path):
    """300 rows pad to 304 at TP 1, 2, 4 and 8, so the one stored shape loads at each of them."""
    from soft.config.root import load_config
    from soft.models.gpt import padded_vocab_size

    make_hf_model(tmp_path / "hf")
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", dtype="fp32", progress=False)
    model = load_config(out / "model.yaml").model
    assert model.vocab_size == 300
    assert {padded_vocab_size(300, model, tp) for tp in (1, 2, 4, 8)} == {304}
    back = tmp_path / "back"
    convert_megatron_to_hf(ExportRequest(out, back, tokenizer=BUILTIN_TOKENIZER, progress=False))
    assert load_file(next(back.glob("*.safetensors")))["lm_head.weight"].shape[0] == 300


def test_padding_rows_are_named_with_the_option_that_avoids_them(tmp_path, caplog):
    """Zero padding rows join megatron's softmax (tests/evaluation/test_eval_from_import.py
    proves the loss equals transformers' without them): the import says so, and how to avoid
    them; --max-tensor-parallel 4 pads 300 to nothing."""
    from soft.config.root import load_config
    from soft.models.gpt import padded_vocab_size

    make_hf_model(tmp_path / "hf")
    with caplog.at_level("WARNING", logger="soft.conversion.hf_to_megatron"):
        convert_hf_to_megatron(tmp_path / "hf", tmp_path / "a", dtype="fp32", progress=False)
    assert "the 4 zero padding rows join the softmax" in caplog.text
    assert "--max-tensor-parallel 4 imports without padding" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="soft.conversion.hf_to_megatron"):
        out = convert_hf_to_megatron(
            tmp_path / "hf", tmp_path / "b", dtype="fp32", max_tp=4, progress=False
        )
    assert "padding rows" not in caplog.text
    model = load_config(out / "model.yaml").model
    assert {padded_vocab_size(300, model, tp) for tp in (1, 2, 4)} == {300}


def test_llama2_vocab_needs_no_padding():
    from soft.conversion.vocab import stable_divisor

    assert stable_divisor(32000) == (4000, 32000)  # LLaMA-2: softmax over exactly HF's vocabulary
    assert stable_divisor(32001) == (4001, 32008)


def test_model_yaml_drives_the_launcher_config(tmp_path):
    from soft.config.root import load_config

    make_hf_model(tmp_path / "hf", tokenizer=BUILTIN_TOKENIZER, vocab=512)
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", progress=False)
    (tmp_path / "run.yaml").write_text(
        f"defaults: [{out / 'model.yaml'}]\ntrain:\n  train_iters: 30\n"
    )
    cfg = load_config(tmp_path / "run.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_query_groups) == (3, 48, 2)
    assert cfg.model.params_dtype == "fp32" and cfg.model.rotary_base == 10000  # as stored
    assert cfg.data.tokenizer_path == str(out / "tokenizer.model")
    assert (out / "tokenizer.model").read_bytes() == BUILTIN_TOKENIZER.read_bytes()
    assert (out / "latest").read_text().strip() == "iter_0000000"


@pytest.mark.parametrize(
    ("stored", "name"), [(torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")]
)
def test_default_dtype_keeps_the_stored_precision_bit_exact(tmp_path, stored, name):
    """--dtype auto (the default): LLaMA-2's fp16 weights stay fp16 (a bf16 default would round
    every one); the round trip back to HF returns the very same bits, and model.yaml trains in
    the stored dtype unless overridden."""
    import torch.distributed.checkpoint as dcp

    from soft.config.root import load_config

    make_hf_model(tmp_path / "hf", dtype=stored)
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", progress=False)
    assert load_config(out / "model.yaml").model.params_dtype == name
    meta = dcp.FileSystemReader(str(out / "iter_0000000")).read_metadata().state_dict_metadata
    # Norm weights are fp32 in every megatron checkpoint (lossless widening), the rest as stored.
    dtypes = {m.properties.dtype for k, m in meta.items() if hasattr(m, "size") and "norm" not in k}
    assert dtypes == {stored}
    back = tmp_path / "back"
    convert_megatron_to_hf(ExportRequest(out, back, tokenizer=BUILTIN_TOKENIZER, progress=False))
    original, exported = _all_tensors(tmp_path / "hf"), _all_tensors(back)
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == stored and torch.equal(exported[key], tensor), key


def test_auto_dtype_trusts_the_tensors_over_config_json(tmp_path, caplog):
    import logging

    from soft.config.root import load_config

    make_hf_model(tmp_path / "hf", dtype=torch.float16)
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "bfloat16"  # a config that says otherwise
    config_path.write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="soft.conversion"):
        out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", progress=False)
    assert load_config(out / "model.yaml").model.params_dtype == "fp16"
    assert "config.json says 'bfloat16'; the stored tensors decide" in caplog.text


def test_mixed_storage_becomes_fp32_and_explicit_dtype_casts(tmp_path):
    from safetensors.torch import save_file

    from soft.config.root import load_config

    make_hf_model(tmp_path / "hf", dtype=torch.float16)
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()  # an fp32 norm
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "auto", progress=False)
    assert load_config(out / "model.yaml").model.params_dtype == "fp32"
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "bf16", dtype="bf16", progress=False)
    assert load_config(out / "model.yaml").model.params_dtype == "bf16"


def test_an_fp16_import_fine_tunes_in_bf16_by_override(tmp_path):
    """Training dtype stays a choice: `model.params_dtype=bf16` over an fp16 import loads every
    weight cast to bf16 (round to nearest), as transformers' .to(torch.bfloat16) does."""
    hf = make_hf_model(tmp_path / "hf", dtype=torch.float16)
    out = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "meg", progress=False)
    gpt, vocab = megatron_reference(out, out / "model.yaml", ["model.params_dtype=bf16"])
    weight = gpt.embedding.word_embeddings.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight[:vocab], hf.model.embed_tokens.weight.to(torch.bfloat16))
