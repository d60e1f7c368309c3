"""Exporting a LoRA run (soft.conversion.peft_export), fp32 on CPU, one rank.

One base run (grouped-query attention, so the qkv rows interleave per query group) and one
adapter run over it: 3 steps at lr 1e-3 with rank 4, alpha 8 (scale 2), adapters on layers
1, 3 and 4 only (the stacked adapter axis is not the layer index) and a trained final norm.

- merged export (soft-export with no flag): its transformers logits equal the unmerged
  megatron model's (base weights + adapters as trained) at every exit, full and --exit-layer 2;
  atol 2e-5 + rtol 1e-5 as every megatron-vs-HF check here (summation order only);
- PEFT adapter (--peft-adapter): PeftModel.from_pretrained over the base's own export gives
  the merged export's logits at every exit (atol 1e-5, rtol 1e-5: W'x against Wx + s B(Ax)),
  and the --exit-layer 2 adapter over the base's exit-2 export the merged exit-2 export's;
- a second adapter run (every layer, linear_qkv and linear_fc2 only, frozen norm) merges and
  loads in PEFT alike, its adapter_config without layers_to_transform or modules_to_save;
- a base that is gone or holds other weights is refused naming both paths, with no output
  folder left behind; --peft-adapter on a full checkpoint is refused.
Measured (max |diff|, logits up to ~0.7): megatron vs merged 2.4e-7, PEFT vs merged 2.7e-7,
exit-2 PEFT vs merged 1.3e-7; the adapters move the logits by 0.04, and a q/k/v row mix-up of B
or an unmerged linear_fc2 fails every comparison (by 4e-3 to 8e-3).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from soft.conversion import ExportRequest, convert_megatron_to_hf
from tests.conversion.helpers import hf_logits_and_exits, megatron_logits_and_exits
from tests.megatron_env import single_rank_world, tiny_config

MEGATRON_TOL = {"atol": 2e-5, "rtol": 1e-5}
PEFT_TOL = {"atol": 1e-5, "rtol": 1e-5}
GQA = "model.num_query_groups=2"
LORA = (
    "peft.method=lora",
    "peft.rank=4",
    "peft.alpha=8",
    "peft.layers=[1,3,4]",
    "peft.train_final_norm=true",
    "checkpoint.finetune=true",
)


def _run(out: Path, *overrides: str) -> None:
    from soft.training.cli import run_training

    single_rank_world()
    cfg = tiny_config(
        f"train.output_dir={out}",
        "train.eval_interval=0",
        "train.lr_warmup_iters=1",
        "train.lr=1e-3",
        "tracking.enabled=false",
        "checkpoint.keep_last=1",
        GQA,
        *overrides,
    )
    run_training(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The base run's and the adapter run's checkpoints folders."""
    root = tmp_path_factory.mktemp("lora-export")
    _run(root / "base", "train.train_iters=2")
    base = root / "base/checkpoints"
    _run(root / "lora", "train.train_iters=3", *LORA, f"checkpoint.load_dir={base}")
    return {"base": base, "lora": root / "lora/checkpoints", "root": root}


def _export(ckpt: Path, out: Path, **kwargs) -> Path:
    request = ExportRequest(checkpoint_dir=ckpt, out_dir=out, progress=False, **kwargs)
    return convert_megatron_to_hf(request)


@pytest.fixture(scope="module")
def exports(runs) -> dict[str, Path]:
    """Merged (full, exit 2), base (full, exit 2) and PEFT adapter (full, exit 2) folders."""
    root = runs["root"]
    return {
        "merged": _export(runs["lora"], root / "merged"),
        "merged2": _export(runs["lora"], root / "merged2", exit_layer=2),
        "base": _export(runs["base"], root / "base_hf"),
        "base2": _export(runs["base"], root / "base_hf2", exit_layer=2),
        "adapter": _export(runs["lora"], root / "adapter", peft_adapter=True),
        "adapter2": _export(runs["lora"], root / "adapter2", peft_adapter=True, exit_layer=2),
    }


def _unmerged_model(adapter_checkpoints: Path):
    """The adapter run's model as it trained: base weights from the base checkpoint, adapters
    and final norm from the run's, adapters applied in forward (nothing merged)."""
    from soft.checkpointing.checkpoint import load_weights
    from soft.checkpointing.directory import find_checkpoint
    from soft.config.root import load_config
    from soft.data import build_tokenizer
    from soft.models.gpt import build_stage_model, padded_vocab_size
    from soft.peft.base import resolve_base, trained_keys
    from soft.peft.lora import apply_lora
    from soft.training.model import transformer_config

    single_rank_world()
    ckpt = find_checkpoint(adapter_checkpoints).path
    cfg = load_config(ckpt / "config.yaml")
    vocab = cfg.model.vocab_size or build_tokenizer(cfg.data).vocab_size
    padded = padded_vocab_size(vocab, cfg.model, 1)
    gpt = build_stage_model(
        cfg.model, transformer_config(cfg.model, cfg.parallel), padded, True, True
    )
    apply_lora([gpt], cfg.peft, cfg.train.seed)
    trained = trained_keys([gpt])
    load_weights(resolve_base(ckpt), [gpt], keep=lambda key: key not in trained)
    load_weights(ckpt, [gpt], keep=trained.__contains__)
    return gpt.eval(), vocab


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def _peft(base: Path, adapter: Path):
    # peft is pinned in the eval extra that scripts/setup.sh installs: a missing one fails here
    # rather than skipping the reference this export is checked against.
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(base), adapter).eval()


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(3))


def test_the_run_trained_what_the_export_must_carry(runs) -> None:
    """The checks below could not fail if B were zero or the final norm untouched."""
    from megatron.core import dist_checkpointing

    from soft.checkpointing.directory import find_checkpoint

    lora = dist_checkpointing.load_plain_tensors(str(find_checkpoint(runs["lora"]).path))
    base = dist_checkpointing.load_plain_tensors(str(find_checkpoint(runs["base"]).path))
    b_keys = [k for k in lora if k.startswith("decoder.") and k.endswith(".lora.b")]
    assert len(b_keys) == 4 and all(lora[k].shape[0] == 3 for k in b_keys)
    assert all(lora[k].abs().sum() > 0 for k in b_keys)
    norm = "decoder.final_layernorm.weight"
    assert not torch.equal(lora[norm], base[norm])


def test_merged_export_equals_the_unmerged_model_at_every_exit(runs, exports) -> None:
    gpt, vocab = _unmerged_model(runs["lora"])
    tokens = _tokens(vocab)
    logits, exits = megatron_logits_and_exits(gpt, tokens, vocab)
    hf_logits, hf_exits = hf_logits_and_exits(_hf(exports["merged"]), tokens)
    torch.testing.assert_close(hf_logits, logits, **MEGATRON_TOL)
    for k, expected in exits.items():
        torch.testing.assert_close(hf_exits[k], expected, **MEGATRON_TOL)
    # The sub-model at 2: the first two layers (one adapted) + the trained norm and the head.
    sub_logits, _ = hf_logits_and_exits(_hf(exports["merged2"]), tokens)
    torch.testing.assert_close(sub_logits, exits[2], **MEGATRON_TOL)
    # The base alone is another model: the adapters moved the logits.
    base_logits, _ = hf_logits_and_exits(_hf(exports["base"]), tokens)
    assert (base_logits - logits).abs().max() > 100 * MEGATRON_TOL["atol"]


def test_peft_adapter_over_the_base_export_equals_the_merged_export(exports) -> None:
    from safetensors.torch import load_file

    peft_model = _peft(exports["base"], exports["adapter"])
    merged = _hf(exports["merged"])
    tokens = _tokens(merged.config.vocab_size)
    logits, exits = hf_logits_and_exits(merged, tokens)
    peft_logits, peft_exits = hf_logits_and_exits(peft_model.get_base_model(), tokens)
    torch.testing.assert_close(peft_logits, logits, **PEFT_TOL)
    for k, expected in exits.items():
        torch.testing.assert_close(peft_exits[k], expected, **PEFT_TOL)
    config = json.loads((exports["adapter"] / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["layers_to_transform"] == [0, 2, 3]
    assert config["modules_to_save"] == ["model.norm"]
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    keys = load_file(exports["adapter"] / "adapter_model.safetensors")
    assert "base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight" in keys
    assert not any(".layers.1." in k for k in keys)


def test_exit_adapter_over_the_exit_base_export_equals_the_merged_exit_export(exports) -> None:
    from safetensors.torch import load_file

    peft_model = _peft(exports["base2"], exports["adapter2"])
    merged = _hf(exports["merged2"])
    tokens = _tokens(merged.config.vocab_size)
    logits, _ = hf_logits_and_exits(merged, tokens)
    peft_logits, _ = hf_logits_and_exits(peft_model.get_base_model(), tokens)
    torch.testing.assert_close(peft_logits, logits, **PEFT_TOL)
    config = json.loads((exports["adapter2"] / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0]
    assert all(".layers.0." in k or "model.norm" in k for k in load_file(
        exports["adapter2"] / "adapter_model.safetensors"
    ))  # fmt: skip


def _rebased_copy(runs, tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the adapter checkpoint and of its base, the copy naming the copied base."""
    from soft.checkpointing.directory import find_checkpoint
    from soft.checkpointing.manifest import MANIFEST

    lora, base = tmp_path / "lora/iter", tmp_path / "base/iter"
    shutil.copytree(find_checkpoint(runs["lora"]).path, lora)
    shutil.copytree(find_checkpoint(runs["base"]).path, base)
    manifest = json.loads((lora / MANIFEST).read_text())
    manifest["peft_base"]["path"] = str(base.resolve())
    (lora / MANIFEST).write_text(json.dumps(manifest))
    return lora, base


def test_a_changed_or_missing_base_is_refused_and_nothing_is_written(runs, tmp_path) -> None:
    from soft.checkpointing.directory import CheckpointError
    from soft.checkpointing.manifest import MANIFEST

    lora, base = _rebased_copy(runs, tmp_path)
    manifest = json.loads((base / MANIFEST).read_text())
    manifest["iteration"] += 1  # any other base: its manifest's checksum differs
    (base / MANIFEST).write_text(json.dumps(manifest))
    for peft_adapter in (False, True):
        out = tmp_path / f"out{peft_adapter}"
        with pytest.raises(
            CheckpointError, match=rf"'{re.escape(str(lora))}'.*'{re.escape(str(base))}'.*now holds"
        ):
            _export(lora, out, peft_adapter=peft_adapter)
        assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match=rf"'{re.escape(str(base))}', which is gone"):
        _export(lora, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_peft_adapter_of_a_full_checkpoint_is_refused(runs, tmp_path) -> None:
    from soft.config.errors import ConfigError

    with pytest.raises(ConfigError, match="holds full weights, not adapters"):
        _export(runs["base"], tmp_path / "out", peft_adapter=True)
    assert not (tmp_path / "out").exists()


def test_cli_peft_adapter(runs, tmp_path) -> None:
    from soft.conversion.cli_export import main

    out = tmp_path / "adapter"
    argv = ["--checkpoint-dir", str(runs["lora"]), "--out-dir", str(out), "--peft-adapter"]
    assert main([*argv, "--base-model", "org/base", "--no-progress"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"
    other = tmp_path / "other"
    assert (
        main(["--checkpoint-dir", str(runs["base"]), "--out-dir", str(other), "--peft-adapter"])
        == 2
    )
    assert not other.exists()


def test_every_layer_and_some_targets_export_without_layer_or_norm_fields(
    runs, exports, tmp_path
) -> None:
    """peft.layers null, two of the four targets, the norm frozen: the merge leaves the other
    modules as the base has them, and the PEFT config has no layers_to_transform and no
    modules_to_save."""
    targets = "peft.target_modules=[linear_qkv,linear_fc2]"
    lora = (*LORA[:2], "peft.alpha=4", targets, "checkpoint.finetune=true")
    _run(tmp_path / "run", "train.train_iters=2", *lora, f"checkpoint.load_dir={runs['base']}")
    checkpoints = tmp_path / "run/checkpoints"
    merged = _hf(_export(checkpoints, tmp_path / "merged"))
    adapter = _export(checkpoints, tmp_path / "adapter", peft_adapter=True)
    gpt, vocab = _unmerged_model(checkpoints)
    tokens = _tokens(vocab)
    _, exits = megatron_logits_and_exits(gpt, tokens, vocab)
    logits, hf_exits = hf_logits_and_exits(merged, tokens)
    for k, expected in exits.items():
        torch.testing.assert_close(hf_exits[k], expected, **MEGATRON_TOL)
    peft_model = _peft(exports["base"], adapter).get_base_model()
    peft_logits, _ = hf_logits_and_exits(peft_model, tokens)
    torch.testing.assert_close(peft_logits, logits, **PEFT_TOL)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    assert config["layers_to_transform"] is None and config["modules_to_save"] is None
    assert config["lora_alpha"] == 4 and config["r"] == 4


def test_a_layer_subset_adapter_run_resumes(runs, tmp_path) -> None:
    """Its stacked adapters count 3 layers of 4: a checkpoint of the adapted subset, not a
    3-layer model (soft.checkpointing.requests.stored_num_layers); refused before."""
    from soft.checkpointing.directory import find_checkpoint

    shutil.copytree(runs["root"] / "lora", tmp_path / "lora")
    _run(tmp_path / "lora", "train.train_iters=4", *LORA, f"checkpoint.load_dir={runs['base']}")
    assert find_checkpoint(tmp_path / "lora/checkpoints").path.name == "iter_0000004"
