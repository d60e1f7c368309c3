"""Sample layout, loss mask, overlong handling, text windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from soft.config.errors import ConfigError
from soft.data import SFTDataset, Tokenizer
from soft.data.builtin import BUILTIN_TOKENIZER_PATH
from soft.data.prompts import alpaca_prompt, triviaqa_prompt


@pytest.fixture(scope="module")
def llama(llama2_tokenizer: Path) -> Tokenizer:
    return Tokenizer.from_file(llama2_tokenizer)


@pytest.fixture(scope="module")
def small() -> Tokenizer:
    return Tokenizer.from_file(BUILTIN_TOKENIZER_PATH)


def test_alpaca_layout_and_mask_hand_checked(llama: Tokenizer) -> None:
    prompt = alpaca_prompt("Greet the world.")
    ds = SFTDataset.from_pairs([(prompt, "Hello world")], llama, seq_length=64)
    sample = ds[0]
    assert sample["tokens"].dtype == torch.long and sample["labels"].dtype == torch.long
    assert sample["loss_mask"].dtype == torch.float
    assert all(v.shape == (64,) for v in sample.values())

    prompt_ids = llama.encode(prompt)
    assert len(prompt_ids) == 40 and prompt_ids[-6:] == [13, 2277, 29937, 13291, 29901, 13]
    # After "### Response:\n" the response is 'Hello' (10994, no '▁') + '▁world' (3186).
    full = [1, *prompt_ids, 10994, 3186, 2]
    n = len(full) - 1  # 42 real positions
    assert sample["tokens"][:n].tolist() == full[:-1]
    assert sample["labels"][:n].tolist() == full[1:]
    assert sample["tokens"][n:].eq(llama.pad_id).all()
    mask = sample["loss_mask"]
    # Exactly the response tokens and the EOS are in the loss.
    assert mask.tolist() == [0.0] * 40 + [1.0] * 3 + [0.0] * (64 - 43)
    assert sample["labels"][mask.bool()].tolist() == [10994, 3186, 2]
    assert llama.decode(sample["labels"][mask.bool()].tolist()) == "Hello world"
    assert ds.stats.num_loss_tokens == 3


def test_triviaqa_target_alias(llama: Tokenizer) -> None:
    ds = SFTDataset.from_pairs([(triviaqa_prompt("Capital of France?"), " Paris")], llama, 32)
    sample = ds[0]
    assert sample["labels"][sample["loss_mask"].bool()].tolist() == [3681, 2]  # '▁Paris', EOS


def test_truncate_vs_drop_counts(small: Tokenizer) -> None:
    short = ("Q: ", "a")
    long_response = ("Q: ", "word " * 40)
    long_prompt = ("word " * 40, "a")
    pairs = [short, long_response, long_prompt, short]

    cut = SFTDataset.from_pairs(pairs, small, seq_length=16, overlong="truncate")
    s = cut.stats
    assert (s.num_records, s.num_samples, s.num_truncated, s.num_dropped) == (4, 3, 1, 1)
    truncated = cut[1]
    assert truncated["loss_mask"][-1] == 1.0  # fills the window, response to the end
    assert small.eos_id not in truncated["labels"][truncated["loss_mask"].bool()].tolist()
    assert "3 samples" in cut.describe() and "1 truncated, 1 dropped" in cut.describe()

    dropped = SFTDataset.from_pairs(pairs, small, seq_length=16, overlong="drop")
    s = dropped.stats
    assert (s.num_samples, s.num_truncated, s.num_dropped) == (2, 0, 2)


def test_exact_fit_is_not_overlong(small: Tokenizer) -> None:
    prompt_ids, response_ids = small.encode_pair("Q: ", "abc")
    seq = 1 + len(prompt_ids) + len(response_ids)  # BOS + prompt + response; EOS is a label
    ds = SFTDataset.from_pairs([("Q: ", "abc")], small, seq_length=seq)
    assert ds.stats.num_truncated == 0
    assert ds[0]["labels"][-1] == small.eos_id and ds[0]["loss_mask"][-1] == 1.0


def test_empty_after_filter_names_file_and_reason(small: Tokenizer) -> None:
    pairs = [("Q: ", "word " * 40)] * 12
    with pytest.raises(
        ConfigError,
        match=r"'train\.jsonl': no samples left: all 12 records longer than data\.seq_length=32",
    ):
        SFTDataset.from_pairs(pairs, small, 32, overlong="drop", source="train.jsonl")
    with pytest.raises(ConfigError, match=r"all 2 records with a prompt that alone fills"):
        SFTDataset.from_pairs([("word " * 40, "a")] * 2, small, 32, source="t.json")


def test_text_windows_cover_every_token(small: Tokenizer) -> None:
    doc = " ".join(f"w{i}" for i in range(40))
    ids = small.encode(doc)
    ds = SFTDataset.from_documents([doc, "tiny", "  "], small, seq_length=16)
    full = [small.bos_id, *ids, small.eos_id]
    n_windows = -(-(len(full) - 1) // 16)
    assert len(ds) == n_windows + 1
    assert ds.stats.num_dropped == 1  # the blank document
    labels = torch.cat([ds[i]["labels"][ds[i]["loss_mask"].bool()] for i in range(n_windows)])
    assert labels.tolist() == full[1:]  # every token after BOS is a target exactly once
    tokens = torch.cat([ds[i]["tokens"][ds[i]["loss_mask"].bool()] for i in range(n_windows)])
    assert tokens.tolist() == full[:-1]
    assert ds[0]["loss_mask"].all()  # loss on all tokens, no prompt
