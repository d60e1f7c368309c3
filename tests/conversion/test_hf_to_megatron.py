"""HF -> megatron against transformers: logits, every exit, the exact checkpoint layout, and the
bit-exact round trip back to HF.

Tolerance (fp32, CPU): the two implementations differ only in summation order (fused QKV matmul
vs three matmuls, megatron's baddbmm attention vs HF's sdpa, RMSNorm op order), which moves
logits of magnitude ~4 by ~3e-6; we allow atol 2e-5 + rtol 1e-5. A mapping error (swapped norms,
wrong QKV grouping, a RoPE permutation) changes them by O(1).
"""

from __future__ import annotations

import json

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
    assert cfg.model.params_dtype == "bf16" and cfg.model.rotary_base == 10000
    assert cfg.data.tokenizer_path == str(out / "tokenizer.model")
    assert (out / "tokenizer.model").read_bytes() == BUILTIN_TOKENIZER.read_bytes()
    assert (out / "latest").read_text().strip() == "iter_0000000"
