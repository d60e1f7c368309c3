"""Hugging Face tokenizers beside SentencePiece: every path form data.tokenizer_path takes, the
special tokens each kind defines, the samples built with them and the cache key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from soft.config.errors import ConfigError
from soft.data import DataConfig, SFTDataset, build_datasets, load_tokenizer
from soft.data.builtin import BUILTIN_TOKENIZER_PATH, generate_records, train_hf_tokenizer
from soft.data.prompts import alpaca_prompt
from soft.data.tokenizer import HFTokenizer, SentencePieceTokenizer


def test_every_path_form_loads_the_kind_it_names(tmp_path: Path, hf_tokenizers) -> None:
    chatml = hf_tokenizers["chatml"]
    folder = load_tokenizer(chatml)
    assert isinstance(folder, HFTokenizer) and folder.kind == "hf"
    as_file = load_tokenizer(chatml / "tokenizer.json")  # its folder's config applies
    assert as_file.identity()["sha256"] == folder.identity()["sha256"]
    assert as_file.eos_id == folder.eos_id and as_file.chat_template == folder.chat_template

    sp_file = load_tokenizer(BUILTIN_TOKENIZER_PATH)
    assert isinstance(sp_file, SentencePieceTokenizer) and sp_file.kind == "sentencepiece"
    sp_folder = tmp_path / "sp"
    sp_folder.mkdir()
    shutil.copy(BUILTIN_TOKENIZER_PATH, sp_folder / "tokenizer.model")
    assert load_tokenizer(sp_folder).identity()["sha256"] == sp_file.identity()["sha256"]

    both = shutil.copytree(chatml, tmp_path / "both")  # an HF model folder with both files
    shutil.copy(BUILTIN_TOKENIZER_PATH, both / "tokenizer.model")
    assert load_tokenizer(both).kind == "hf"
    assert load_tokenizer(both / "tokenizer.model").kind == "sentencepiece"  # a file decides

    moved = shutil.copytree(chatml, tmp_path / "elsewhere")
    assert load_tokenizer(moved).identity()["sha256"] == folder.identity()["sha256"]
    assert load_tokenizer(moved).identity()["path"] == str(moved)


def test_bad_tokenizer_paths_name_the_path_and_what_was_expected(tmp_path: Path, hf_tokenizers):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"'.*empty' holds neither tokenizer.json .* nor"):
        load_tokenizer(empty)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_tokenizers["chatml"] / "tokenizer.json", bare)  # no tokenizer_config.json
    with pytest.raises(ConfigError, match=r"defines no EOS token .*tokenizer_config.json"):
        load_tokenizer(bare)
    other = tmp_path / "vocab.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match=r"'.*vocab\.json': expected a tokenizer.json"):
        load_tokenizer(other)
    with pytest.raises(ConfigError, match=r"tokenizer file '.*missing.json' does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    broken = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"'.*broken' could not be loaded by transformers"):
        load_tokenizer(broken)


def test_special_tokens_are_the_tokenizers_own(hf_tokenizers) -> None:
    llama3, chatml = (
        load_tokenizer(hf_tokenizers["llama3"]),
        load_tokenizer(hf_tokenizers["chatml"]),
    )
    # LLaMA-3 style: BOS added by the tokenizer; instruct EOS <|eot_id|>; no pad token -> EOS.
    assert llama3.hf.convert_ids_to_tokens([llama3.bos_id, llama3.eos_id]) == [
        "<|begin_of_text|>",
        "<|eot_id|>",
    ]
    assert llama3.hf.pad_token_id is None and llama3.pad_id == llama3.eos_id
    assert llama3.encode("hi", bos=True)[0] == llama3.bos_id
    # Qwen style: no BOS at all (none is added even when asked), pad <|endoftext|>.
    assert chatml.bos_id is None and chatml.encode("hi", bos=True) == chatml.encode("hi")
    assert chatml.hf.convert_ids_to_tokens([chatml.eos_id, chatml.pad_id]) == [
        "<|im_end|>",
        "<|endoftext|>",
    ]
    sp = load_tokenizer(BUILTIN_TOKENIZER_PATH)
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 2)
    for tok in (llama3, chatml, sp):
        text = "Reverse the letters.\n\nxqz Ünïcode ✓ 123"
        assert tok.decode(tok.encode(text)) == text
        assert tok.newline_ids() and all("\n" in tok.decode([i]) for i in tok.newline_ids())


def test_a_defined_but_never_added_bos_is_not_prepended(tmp_path: Path, hf_tokenizers) -> None:
    """SmolLM2 defines a bos_token its tokenizer never adds: BOS follows the post-processor."""
    folder = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "smol")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|im_start|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.hf.bos_token_id is not None and tok.bos_id is None


@pytest.mark.parametrize("style", ["llama3", "chatml"])
def test_alpaca_samples_with_hf_tokenizers(style: str, hf_tokenizers) -> None:
    """[BOS if the tokenizer adds one] + prompt + response + [EOS]; pad id after, masked."""
    tok = load_tokenizer(hf_tokenizers[style])
    prompt = alpaca_prompt("What is 2 plus 3?")
    sample = SFTDataset.from_pairs([(prompt, "5")], tok, seq_length=64)[0]
    prompt_ids, response_ids = tok.encode_pair(prompt, "5")
    bos = [] if tok.bos_id is None else [tok.bos_id]
    full = [*bos, *prompt_ids, *response_ids, tok.eos_id]
    n = len(full) - 1
    assert sample["tokens"][:n].tolist() == full[:-1] and sample["labels"][:n].tolist() == full[1:]
    assert sample["tokens"][n:].eq(tok.pad_id).all() and not sample["loss_mask"][n:].any()
    trained = sample["labels"][sample["loss_mask"].bool()].tolist()
    assert trained == [*response_ids, tok.eos_id] and tok.decode(trained) == "5"
    assert (sample["tokens"][0] == tok.bos_id) == (style == "llama3")


def test_text_documents_without_bos(hf_tokenizers) -> None:
    tok = load_tokenizer(hf_tokenizers["chatml"])
    doc = " ".join(f"w{i}" for i in range(30))
    ds = SFTDataset.from_documents([doc], tok, seq_length=16)
    labels = [
        t for i in range(len(ds)) for t in ds[i]["labels"][ds[i]["loss_mask"].bool()].tolist()
    ]
    assert labels == [*tok.encode(doc), tok.eos_id][1:]  # no BOS: the first token is no label


def test_hf_tokenizer_builder_is_deterministic(tmp_path: Path, hf_tokenizers) -> None:
    again = train_hf_tokenizer(tmp_path / "again", "chatml")
    assert load_tokenizer(again).sha256() == load_tokenizer(hf_tokenizers["chatml"]).sha256()


def _alpaca_file(path: Path, count: int) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in generate_records(3, count)) + "\n")
    return path


def test_cache_key_holds_the_tokenizer_kind_checksum_and_template(
    tmp_path: Path, hf_tokenizers
) -> None:
    data = _alpaca_file(tmp_path / "train.jsonl", 30)
    cache = tmp_path / "cache"

    def entries(**options) -> set[str]:
        build_datasets(DataConfig(train_path=str(data), cache_dir=str(cache), **options), 0)
        return {p.name for p in cache.iterdir()}

    sp = entries()
    chatml = entries(tokenizer_path=str(hf_tokenizers["chatml"]))
    assert len(chatml - sp) == 1
    moved = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "moved")
    assert entries(tokenizer_path=str(moved / "tokenizer.json")) == chatml  # same content: hit
    chat = entries(tokenizer_path=str(moved), prompt_template="chat")
    assert len(chat - chatml) == 1  # another template: another entry
    edited = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "edited")
    template = (edited / "chat_template.jinja").read_text()
    (edited / "chat_template.jinja").write_text(template.replace("helpful", "careful"))
    assert len(entries(tokenizer_path=str(edited), prompt_template="chat") - chat) == 1
    (entry,) = chat - chatml
    inputs = json.loads((cache / entry / "meta.json").read_text())["inputs"]
    assert inputs["tokenizer_kind"] == "hf" and inputs["prompt_template"] == "chat"


def test_chat_template_needs_an_hf_tokenizer_with_one(tmp_path: Path, hf_tokenizers) -> None:
    with pytest.raises(ConfigError, match=r"data.prompt_template=chat needs a Hugging Face"):
        build_datasets(DataConfig(prompt_template="chat"), 0)  # the built-in SentencePiece
    base = shutil.copytree(hf_tokenizers["chatml"], tmp_path / "base")
    (base / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match=r"'.*base' has no chat template"):
        build_datasets(DataConfig(prompt_template="chat", tokenizer_path=str(base)), 0)
    with pytest.raises(ConfigError, match=r"'data.format' is 'messages'.*prompt_template"):
        DataConfig(format="messages", train_path="x.jsonl").validate()
    with pytest.raises(ConfigError, match=r"'data.prompt_template' is 'chat' but"):
        DataConfig(format="text", train_path="x.jsonl", prompt_template="chat").validate()
