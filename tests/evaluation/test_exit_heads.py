"""ICT heads (soft.mode=ict: one own norm + head per early exit) from the megatron checkpoint
through export to every evaluation path, and per-example exact match for win rates.

The ICT checkpoint is written by `make_ict_checkpoint` the way the ICT trainer stores it (plain
keys `exit_heads.<k>.final_layernorm.weight` / `exit_heads.<k>.output_layer.weight`, the head
vocabulary-padded: 515 rows -> 520). fp32 on CPU throughout; the hand computations use other
kernels (F.linear on hand-normed states), hence rel 1e-5 where they are compared.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from soft.config.errors import ConfigError
from soft.conversion import ExportRequest, convert_megatron_to_hf
from soft.data.prompts import triviaqa_prompt
from soft.evaluation import (
    GenerateOptions,
    LayerRunner,
    dynamic_generate,
    exit_nll,
    generate_ids,
    greedy_generate,
    load_exported_model,
    run_eval_exits,
    speculative_generate,
)
from soft.evaluation.model_io import EXIT_HEADS_FILE
from soft.evaluation.runner import stop_ids
from tests.conversion.helpers import BUILTIN_TOKENIZER, make_hf_model, make_ict_checkpoint

VOCAB, HIDDEN, LAYERS = 515, 48, 3  # 515 pads to 520 rows in megatron
IDS = [1, 17, 230, 41, 99, 7, 402, 55, 2]
NUM_TARGET = 4


def _norm_key(k: int) -> str:
    return f"exit_heads.{k}.final_layernorm.weight"


def _output_key(k: int) -> str:
    return f"exit_heads.{k}.output_layer.weight"


def _export(ckpt: Path, out: Path, exit_layer: int | None = None) -> Path:
    return convert_megatron_to_hf(ExportRequest(ckpt, out, exit_layer=exit_layer, progress=False))


@pytest.fixture(scope="module")
def ict(tmp_path_factory) -> SimpleNamespace:
    """A 3-layer ICT checkpoint with heads for exits 1 and 2, and its full export."""
    root = tmp_path_factory.mktemp("ict")
    hf = make_hf_model(
        root / "hf", vocab=VOCAB, hidden=HIDDEN, layers=LAYERS, tokenizer=BUILTIN_TOKENIZER
    )
    heads = make_ict_checkpoint(root / "hf", root / "meg", [1, 2, 3], seed=5)
    full = _export(root / "meg", root / "full")
    return SimpleNamespace(root=root, hf=hf, heads=heads, ckpt=root / "meg", full=full)


@pytest.fixture(scope="module")
def loaded(ict):
    return load_exported_model(ict.full, device="cpu", dtype="float32")


# ---------------------------------------------------------------------------------------------
# Export


def test_export_writes_heads_beside_pristine_hf_weights(ict):
    path = ict.full / EXIT_HEADS_FILE
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    stored = load_file(path)
    assert set(stored) == {
        f"exit_heads.{k}.{n}.weight" for k in (1, 2) for n in ("norm", "lm_head")
    }
    for k in (1, 2):
        assert torch.equal(stored[f"exit_heads.{k}.norm.weight"], ict.heads[_norm_key(k)])
        assert torch.equal(
            stored[f"exit_heads.{k}.lm_head.weight"], ict.heads[_output_key(k)][:VOCAB]
        )
    config = json.loads((ict.full / "config.json").read_text())
    assert config["soft_exit_heads"] == [1, 2]
    assert config["soft_exit_mode"] == "ict" and config["soft_exit_layers"] == [1, 2, 3]

    model, info = LlamaForCausalLM.from_pretrained(ict.full, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    # HF's own head is the shared one, untouched by ICT.
    assert torch.equal(model.lm_head.weight, ict.hf.lm_head.weight)
    assert torch.equal(model.model.norm.weight, ict.hf.model.norm.weight)

    half = load_exported_model(ict.full, device="cpu", dtype="bfloat16")
    for norm, head in half.exit_heads.values():  # like the model's own head
        assert norm.weight.dtype == head.weight.dtype == torch.bfloat16
        assert norm.variance_epsilon == half.model.config.rms_norm_eps


@pytest.mark.parametrize("k", [1, 2])
def test_submodel_export_is_the_exit_with_its_own_head(ict, loaded, tmp_path, k):
    out = _export(ict.ckpt, tmp_path / f"sub{k}", exit_layer=k)
    weights = {}
    for file in out.glob("model-*.safetensors"):
        weights.update(load_file(file))
    assert torch.equal(weights["model.norm.weight"], ict.heads[_norm_key(k)])
    assert torch.equal(weights["lm_head.weight"], ict.heads[_output_key(k)][:VOCAB])
    config = json.loads((out / "config.json").read_text())
    assert config["soft_source_exit_layer"] == k and config["num_hidden_layers"] == k
    if k == 2:  # exit 1 keeps its head; exit 2's is the model's own now
        assert config["soft_exit_heads"] == [1]
        assert set(load_file(out / EXIT_HEADS_FILE)) == {
            "exit_heads.1.norm.weight",
            "exit_heads.1.lm_head.weight",
        }
    else:
        assert "soft_exit_heads" not in config and not (out / EXIT_HEADS_FILE).exists()
    # The standalone sub-model scores exactly what exit k of the full ICT export scores.
    sub = load_exported_model(out, device="cpu", dtype="float32")
    assert sorted(sub.exit_heads) == ([1] if k == 2 else [])
    mine = exit_nll(sub.model, IDS, NUM_TARGET, [k], sub.exit_heads)[k][0]
    full = exit_nll(loaded.model, IDS, NUM_TARGET, [k], loaded.exit_heads)[k][0]
    assert mine == pytest.approx(full, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Evaluation


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_exit_nll_on_the_megatron_checkpoint_uses_each_exits_head(ict):
    """eval from the megatron checkpoint itself (exported on the fly) against a hand computation
    with the checkpoint's own tensors: hidden_states[k] -> head norm -> head linear -> CE."""
    exported = load_exported_model(ict.ckpt, device="cpu", dtype="float32")
    assert sorted(exported.exit_heads) == [1, 2]
    model = exported.model
    ours = exit_nll(model, IDS, NUM_TARGET, [1, 2, 3], exported.exit_heads)
    shared = exit_nll(model, IDS, NUM_TARGET, [1, 2, 3])
    ids = torch.tensor([IDS])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    labels = ids[0, -NUM_TARGET:]
    for k in (1, 2):
        hidden = out.hidden_states[k][0, -NUM_TARGET - 1 : -1]
        normed = _rms_norm(hidden, ict.heads[_norm_key(k)], model.config.rms_norm_eps)
        logits = F.linear(normed, ict.heads[_output_key(k)][:VOCAB])
        expected = F.cross_entropy(logits, labels, reduction="sum").item()
        assert ours[k][1] == NUM_TARGET
        assert ours[k][0] == pytest.approx(expected, rel=1e-5)
        assert abs(shared[k][0] - expected) > 1e-2  # the shared head scores differently
    assert ours[3] == shared[3]  # the full model has no ICT head


@pytest.fixture(scope="module")
def shifted():
    """A float64 4-layer model and an ICT head for exit 2 that is the shared head with its rows
    rolled by one: it always picks the token after the shared head's choice."""
    model = tiny_llama(seed=11, layers=4, vocab=500).double()
    norm = LlamaRMSNorm(64, eps=model.config.rms_norm_eps).double()
    head = torch.nn.Linear(64, 500, bias=False).double()
    with torch.no_grad():
        norm.weight.copy_(model.model.norm.weight)
        head.weight.copy_(torch.roll(model.lm_head.weight, 1, dims=0))
    return model, {2: (norm, head)}


def _oracle(model, head, k: int, prompt: list[int], n: int) -> list[int]:
    """Cache-free greedy decoding of exit k through `head`, rerunning the whole sequence."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            hidden = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[k]
            seq.append(int(head[1](head[0](hidden[0, -1])).argmax()))
    return seq[len(prompt) :]


PROMPTS = [[1, 153, 318], [1, 450, 496, 173, 170, 299, 432, 204]]


def test_generation_at_an_exit_uses_its_head(shifted):
    model, heads = shifted
    plain, ict = LayerRunner(model), LayerRunner(model, heads)
    for prompt in PROMPTS:
        first = greedy_generate(plain, prompt, 1, exit_layer=2).token_ids[0]
        tokens = greedy_generate(ict, prompt, 8, exit_layer=2).token_ids
        assert tokens[0] == (first + 1) % 500
        assert tokens == _oracle(model, heads[2], 2, prompt, 8)
        for k in (1, 3, 4):  # exits without an own head are untouched
            expected = greedy_generate(plain, prompt, 8, exit_layer=k).token_ids
            assert greedy_generate(ict, prompt, 8, exit_layer=k).token_ids == expected


def test_dynamic_and_speculative_use_the_exit_head(shifted):
    model, heads = shifted
    ict = LayerRunner(model, heads)
    calls = []
    hook = heads[2][1].register_forward_hook(lambda *_: calls.append(1))
    try:
        for prompt in PROMPTS:
            exit_two = greedy_generate(ict, prompt, 8, exit_layer=2).token_ids
            assert dynamic_generate(ict, prompt, 8, [2, 4], [0.0]).token_ids == exit_two
            calls.clear()
            result = speculative_generate(ict, prompt, 8, draft_exit=2, num_draft=3)
            assert calls, "drafts must come from exit 2's own head"
            assert result.token_ids == greedy_generate(ict, prompt, 8).token_ids
    finally:
        hook.remove()


def test_generate_ids_exit_mode_uses_the_exit_head(loaded):
    prompt = [1, 153, 318, 77]
    result = generate_ids(
        loaded, prompt, GenerateOptions(mode="exit", exit_layer=1, max_new_tokens=6)
    )
    assert result.token_ids == _oracle(loaded.model, loaded.exit_heads[1], 1, prompt, 6)


def test_per_example_exact_match_in_results_json(ict, loaded, tmp_path):
    """run_eval_exits on the megatron checkpoint: answers are chosen from what the exits
    generate, so the expected hit pattern is known exactly (and has hits and misses)."""
    n = 4
    questions = ["Who wrote it?", "Where is York?", "What is two plus two?"]
    tokenizer = loaded.tokenizer
    runner = LayerRunner(loaded.model, loaded.exit_heads)
    stops = stop_ids(tokenizer, at_newline=True)
    outputs: dict[int, list[str]] = {}
    for k in (1, 2, 3):
        outputs[k] = []
        for q in questions:
            ids = greedy_generate(
                runner, tokenizer.encode(triviaqa_prompt(q), bos=True), n, k, stops
            ).token_ids
            outputs[k].append(tokenizer.decode([t for t in ids if t not in stops]))
    answers = [[outputs[1][0]], [outputs[3][1]], ["no such answer"]]
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"turns": [q], "answer": a}) + "\n"
            for q, a in zip(questions, answers, strict=True)
        )
    )
    out = tmp_path / "res.json"
    result = run_eval_exits(
        ict.ckpt, data, "triviaqa", max_new_tokens=n, out=out, device="cpu", progress=False
    )
    saved = json.loads(out.read_text())
    assert set(saved) == {"params", "exits", "per_example"}
    assert saved["params"]["exit_heads"] == [1, 2]
    expected = {
        str(k): [int(outputs[k][i].strip() == answers[i][0].strip()) for i in range(3)]
        for k in (1, 2, 3)
    }
    assert saved["per_example"] == expected == result["per_example"]
    assert expected["1"][0] == expected["3"][1] == 1 and expected["3"][2] == 0
    for row in saved["exits"]:
        hits = saved["per_example"][str(row["layer"])]
        assert len(hits) == 3 and row["exact_match"] == pytest.approx(sum(hits) / len(hits))

    losses_only = run_eval_exits(
        ict.full, data, "triviaqa", max_new_tokens=0, out=tmp_path / "l.json", progress=False
    )
    assert losses_only["per_example"] is None
    assert set(json.loads((tmp_path / "l.json").read_text())) == {"params", "exits"}


# ---------------------------------------------------------------------------------------------
# Bad exit_heads files


def _drop_tensor(folder: Path) -> str:
    tensors = load_file(folder / EXIT_HEADS_FILE)
    del tensors["exit_heads.2.lm_head.weight"]
    save_file(tensors, str(folder / EXIT_HEADS_FILE))
    return "has no tensor 'exit_heads.2.lm_head.weight'"


def _wrong_shape(folder: Path) -> str:
    tensors = load_file(folder / EXIT_HEADS_FILE)
    tensors["exit_heads.1.norm.weight"] = torch.ones(HIDDEN - 1)
    save_file(tensors, str(folder / EXIT_HEADS_FILE))
    return r"'exit_heads.1.norm.weight' has shape \(47,\), expected \(48,\)"


def _edit_config(folder: Path, heads) -> None:
    config = json.loads((folder / "config.json").read_text())
    if heads is None:
        del config["soft_exit_heads"]
    else:
        config["soft_exit_heads"] = heads
    (folder / "config.json").write_text(json.dumps(config))


def _final_layer_listed(folder: Path) -> str:
    _edit_config(folder, [1, 2, 3])
    return r"lists exit 3; ICT heads exist only for early exits 1\.\.2"


def _zero_listed(folder: Path) -> str:
    _edit_config(folder, [0, 1])
    return "lists exit 0"


def _unlisted_head(folder: Path) -> str:
    _edit_config(folder, [1])
    return r"tensors for exits not listed.*exit_heads\.2\.lm_head"


def _file_missing(folder: Path) -> str:
    (folder / EXIT_HEADS_FILE).unlink()
    return r"is missing \(config.json lists ICT heads \[1, 2\]\)"


def _key_missing(folder: Path) -> str:
    _edit_config(folder, None)
    return "exists but config.json has no 'soft_exit_heads'"


@pytest.mark.parametrize(
    "damage",
    [_drop_tensor, _wrong_shape, _final_layer_listed, _zero_listed, _unlisted_head,
     _file_missing, _key_missing],
)  # fmt: skip
def test_bad_exit_heads_file_names_the_file(ict, tmp_path, damage):
    folder = Path(shutil.copytree(ict.full, tmp_path / "model"))
    message = damage(folder)
    with pytest.raises(
        ConfigError, match=re.escape(str(folder / EXIT_HEADS_FILE)) + ".*" + message
    ):
        load_exported_model(folder, device="cpu")
