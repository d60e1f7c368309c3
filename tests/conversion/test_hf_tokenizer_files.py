"""Imports and exports carry a Hugging Face tokenizer's files along byte for byte, so the
import's output folder is itself a data.tokenizer_path and an export keeps the chat template."""

from __future__ import annotations

import json
import shutil

import yaml

from soft.checkpointing.manifest import read_manifest
from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf
from soft.conversion.hf_io import copy_tokenizer_files
from soft.data import load_tokenizer
from tests.conversion.helpers import BUILTIN_TOKENIZER, make_hf_model


def test_an_hf_tokenizer_travels_through_import_and_export(tmp_path, hf_tokenizers):
    chatml = hf_tokenizers["chatml"]
    hf = tmp_path / "hf"
    make_hf_model(hf, vocab=700)  # more rows than the tokenizer's 640 tokens, as Qwen has
    copy_tokenizer_files(chatml, hf)
    meg = convert_hf_to_megatron(hf, tmp_path / "meg", dtype="fp32", progress=False)
    files = sorted(p.name for p in chatml.iterdir())
    for name in files:
        assert (meg / name).read_bytes() == (chatml / name).read_bytes(), name
    model_yaml = yaml.safe_load((meg / "model.yaml").read_text())
    assert model_yaml["data"]["tokenizer_path"] == str(meg)  # no tokenizer.model: the folder
    assert model_yaml["model"]["vocab_size"] == 700
    identity = read_manifest(meg / "iter_0000000")["tokenizer"]
    original = load_tokenizer(chatml).identity()
    assert (identity["kind"], identity["sha256"]) == (original["kind"], original["sha256"])

    out = convert_megatron_to_hf(ExportRequest(meg, tmp_path / "export", progress=False))
    for name in files:
        assert (out / name).read_bytes() == (chatml / name).read_bytes(), name
    exported = load_tokenizer(out)
    assert exported.sha256() == original["sha256"] and exported.chat_template
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 700 and config["bos_token_id"] is None
    assert config["eos_token_id"] == exported.eos_id


def test_a_folder_with_both_tokenizers_names_sentencepiece_and_accepts_both(
    tmp_path, hf_tokenizers
):
    """LLaMA-2 / Mistral folders ship tokenizer.model and tokenizer.json: model.yaml keeps the
    SentencePiece file (as before), and fine-tuning with the folder's HF form is accepted."""
    from soft.checkpointing.compatibility import check_weights_load
    from soft.config.core import flatten, to_dict
    from soft.config.root import load_config

    hf = tmp_path / "hf"
    make_hf_model(hf, vocab=640, tokenizer=BUILTIN_TOKENIZER)
    copy_tokenizer_files(hf_tokenizers["llama3"], hf)
    meg = convert_hf_to_megatron(hf, tmp_path / "meg", dtype="fp32", progress=False)
    assert (meg / "tokenizer.model").read_bytes() == BUILTIN_TOKENIZER.read_bytes()
    model_yaml = yaml.safe_load((meg / "model.yaml").read_text())
    assert model_yaml["data"]["tokenizer_path"] == str(meg / "tokenizer.model")
    ckpt = meg / "iter_0000000"
    forms = read_manifest(ckpt)["tokenizer_forms"]
    assert [f["kind"] for f in forms] == ["hf"] and forms[0]["path"] == str(meg)
    request = flatten(to_dict(load_config(meg / "model.yaml", [])))
    moved = shutil.copytree(meg, tmp_path / "moved", ignore=shutil.ignore_patterns("iter_*"))
    for path in (meg / "tokenizer.model", moved):  # either form, wherever it sits
        check_weights_load(ckpt, request, load_tokenizer(path).identity(), extract=False)
