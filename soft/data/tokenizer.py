"""Tokenizers behind one interface: SentencePiece (`tokenizer.model`, LLaMA-2) and Hugging Face
(`tokenizer.json` + `tokenizer_config.json`, loaded by `transformers.AutoTokenizer`: LLaMA-3,
Mistral, Qwen, SmolLM, ...).

`load_tokenizer(path)` takes what `data.tokenizer_path` names:

- a `.model` file: SentencePiece;
- a `tokenizer.json` file: Hugging Face, loaded from its folder (so the folder's
  tokenizer_config.json, with the special tokens and the chat template, applies);
- a folder: Hugging Face when it holds `tokenizer.json` (an HF model folder, an export, or an
  import's output, which carries the tokenizer files along), else SentencePiece when it holds
  `tokenizer.model`. A folder with both is loaded as Hugging Face does: the chat template and
  the special tokens live in its tokenizer_config.json.

Special tokens are the tokenizer's own. BOS is put first only when the tokenizer itself puts it
there (LLaMA-2, LLaMA-3, Mistral); Qwen defines none and gets none. EOS ends every response and
document. Padding uses the tokenizer's pad token, or EOS when it has none (LLaMA-2, LLaMA-3):
padded positions lie after every real token, are loss-masked (`loss_mask` 0) and, under the
causal mask, never attended to by a real token, so the id only has to exist in the vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm

from soft.config.errors import ConfigError

log = logging.getLogger(__name__)

Kind = Literal["sentencepiece", "hf"]
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# What AutoTokenizer reads for a fast tokenizer: the identity (checksum) covers exactly these,
# and the class it resolved them to (HFTokenizer.class_name).
HF_IDENTITY_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# Carried along by conversions (import and export), so the folder serves every tool as before.
TOKENIZER_FILES = (*HF_IDENTITY_FILES, SENTENCEPIECE_FILE, "vocab.json", "merges.txt")


class Tokenizer(ABC):
    """What the data pipeline, training and evaluation need of a tokenizer."""

    kind: Kind
    path: str

    @staticmethod
    def from_file(path: str | Path) -> Tokenizer:
        """Any form `data.tokenizer_path` takes (see the module docstring)."""
        return load_tokenizer(path)

    # ---- vocabulary and special tokens

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Ids run 0..vocab_size-1; a model may have more embedding rows (Qwen pads its own)."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """The id put first in every sequence, or None for a tokenizer that puts none."""

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    @abstractmethod
    def pad_id(self) -> int: ...

    @abstractmethod
    def newline_ids(self) -> set[int]:
        """Ids whose text contains a newline (stop tokens for one-line answers)."""

    @abstractmethod
    def sha256(self) -> str:
        """Checksum of the tokenizer's content, wherever its files are."""

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to recognise this tokenizer later."""
        return {
            "kind": self.kind,
            "sha256": self.sha256(),
            "vocab_size": self.vocab_size,
            "path": self.path,
        }

    # ---- text

    @abstractmethod
    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens (BOS, EOS, chat markers) left out."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`; `bos` adds BOS when the tokenizer has one, `eos` adds EOS."""
        (ids,) = self.encode_many([text])
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_pair(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Token ids of `prompt` and of the `response` that follows it.

        The response ids are the suffix of encoding `prompt + response` as one text, i.e.
        exactly what the model must generate after seeing the encoded prompt at evaluation
        time. Encoding the response on its own would add SentencePiece's dummy-prefix space
        (" Paris" -> ['▁', '▁Paris'] instead of ['▁Paris']). If a token straddles the
        boundary (the prompt's encoding is not a prefix of the joint one), the split falls
        back to the longest common prefix, so the straddling token counts as response.
        """
        ((prompt_ids, response_ids),) = self.encode_pairs([prompt], [response])
        return prompt_ids, response_ids

    def encode_pairs(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> list[tuple[list[int], list[int]]]:
        """`encode_pair` for many pairs, each list encoded in one batch call."""
        fulls = self.encode_many([p + r for p, r in zip(prompts, responses, strict=True)])
        return [
            split_at_prompt(p, full)
            for p, full in zip(self.encode_many(prompts), fulls, strict=True)
        ]


def split_at_prompt(prompt_ids: Sequence[int], full: Sequence[int]) -> tuple[list[int], list[int]]:
    """`full` (the joint encoding of prompt + response) split after its longest common prefix
    with `prompt_ids` (the prompt's own encoding): (prompt part, response part)."""
    common = 0
    limit = min(len(prompt_ids), len(full))
    while common < limit and prompt_ids[common] == full[common]:
        common += 1
    return list(full[:common]), list(full[common:])


# ----------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A `SentencePieceProcessor` with the LLaMA-2 conventions (BOS first, EOS last).

    LLaMA-2's model has no pad piece, so `pad_id` falls back to the EOS id (see the module
    docstring for why that is safe).
    """

    kind: Kind = "sentencepiece"

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | Path = "<memory>"):
        self._sp = processor
        self.path = str(path)
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ConfigError(
                f"tokenizer '{self.path}' has no BOS or EOS piece "
                f"(bos_id={self._sp.bos_id()}, eos_id={self._sp.eos_id()}); "
                "LLaMA-style training needs both"
            )

    @classmethod
    def load(cls, path: str | Path) -> SentencePieceTokenizer:
        """Load a `tokenizer.model`; a missing or foreign file is a ConfigError naming it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file '{path}' does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(
                f"tokenizer file '{path}' is not a SentencePiece model ({exc}); LLaMA-3's "
                "original/tokenizer.model is a tiktoken file: use the folder's tokenizer.json"
            ) from exc
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def pieces(self) -> list[str]:
        """All vocabulary pieces by id (used to check that a tokenizer is reproducible)."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def newline_ids(self) -> set[int]:
        # LLaMA-2 encodes a newline as the byte piece <0x0A>.
        return {i for i, p in enumerate(self.pieces) if p == "<0x0A>" or "\n" in p}

    def sha256(self) -> str:
        return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        # SentencePiece encodes a list in C++ threads.
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """A fast (Rust `tokenizers`) tokenizer loaded by `transformers.AutoTokenizer`."""

    kind: Kind = "hf"

    def __init__(self, hf: Any, folder: Path, path: str | Path):
        self.hf = hf
        self.folder = folder
        self.path = str(path)
        if not getattr(hf, "is_fast", False):
            raise ConfigError(
                f"tokenizer '{self.path}' loaded as {type(hf).__name__}, not a fast "
                "(tokenizer.json) tokenizer; the chat masking needs character offsets"
            )
        if hf.eos_token_id is None:
            raise ConfigError(
                f"tokenizer '{self.path}' defines no EOS token (no eos_token in "
                f"{folder / 'tokenizer_config.json'}); every response must end with one. "
                "Keep the model's tokenizer_config.json beside its tokenizer.json"
            )

    @classmethod
    def load(cls, folder: Path, shown: str | Path) -> HFTokenizer:
        """AutoTokenizer on `folder`, local files only (never the hub)."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            if (folder / "tokenizer_config.json").is_file():
                hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            else:  # a bare tokenizer.json: no special tokens known (the EOS check says so)
                hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / HF_FILE))
        except Exception as exc:  # transformers raises many types for a broken folder
            raise ConfigError(
                f"tokenizer '{shown}' could not be loaded by transformers.AutoTokenizer "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        return cls(hf, folder, shown)

    @cached_property
    def vocab_size(self) -> int:
        # Added tokens included; max id + 1 rather than len(), in case ids have gaps.
        return max(self.hf.get_vocab().values()) + 1

    @cached_property
    def bos_id(self) -> int | None:
        # Only a BOS the tokenizer itself puts first (its post-processor); a bos_token that is
        # defined but never added (e.g. SmolLM2's) is not prepended either.
        bos = self.hf.bos_token_id
        if bos is None:
            return None
        with_specials = self.hf("a", add_special_tokens=True)["input_ids"]
        return bos if with_specials and with_specials[0] == bos else None

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return self.eos_id if pad is None else int(pad)

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def newline_ids(self) -> set[int]:
        # Byte-level BPE spells "\n" as "Ċ": decode every id rather than read its piece.
        texts = self.hf.batch_decode([[i] for i in range(self.vocab_size)])
        return {i for i, text in enumerate(texts) if "\n" in text}

    @property
    def class_name(self) -> str:
        """The class AutoTokenizer chose: besides the files, a model folder's config.json
        (model_type) can choose it, and two classes may split the same text differently."""
        return type(self.hf).__name__

    def sha256(self) -> str:
        digest = hashlib.sha256(b"class\0" + self.class_name.encode() + b"\0")
        for name in HF_IDENTITY_FILES:
            file = self.folder / name
            if file.is_file():
                digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
        return digest.hexdigest()

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def encode_with_offsets(self, text: str) -> tuple[list[int], Callable[[int], int | None]]:
        """(ids of `text`, char index -> index of the token holding it, None for none)."""
        encoding = self.hf(text, add_special_tokens=False)
        return encoding["input_ids"], encoding.char_to_token

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer `path` names: a tokenizer.model, a tokenizer.json, or a folder with either."""
    path = Path(path)
    if path.is_dir():
        if (path / HF_FILE).is_file():
            return HFTokenizer.load(path, path)
        if (path / SENTENCEPIECE_FILE).is_file():
            return SentencePieceTokenizer.load(path / SENTENCEPIECE_FILE)
        raise ConfigError(
            f"tokenizer folder '{path}' holds neither {HF_FILE} (Hugging Face) nor "
            f"{SENTENCEPIECE_FILE} (SentencePiece)"
        )
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"tokenizer file '{path}' does not exist")
        if path.name != HF_FILE:
            raise ConfigError(
                f"tokenizer file '{path}': expected a {HF_FILE} (with its tokenizer_config.json "
                f"beside it), a {SENTENCEPIECE_FILE} or a folder holding either"
            )
        return HFTokenizer.load(path.parent, path)
    return SentencePieceTokenizer.load(path)
