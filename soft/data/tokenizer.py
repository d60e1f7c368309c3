"""SentencePiece tokenizer with the LLaMA-2 conventions (BOS first, EOS after the response)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from soft.config.errors import ConfigError


class Tokenizer:
    """A thin wrapper around `SentencePieceProcessor`.

    LLaMA-2's model has no pad piece, so `pad_id` falls back to the EOS id: padded positions
    are loss-masked anyway, and reusing a real id keeps the embedding table at `vocab_size`.
    """

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
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.model`; a missing or foreign file is a ConfigError naming it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer file '{path}' does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(
                f"tokenizer file '{path}' is not a SentencePiece model ({exc})"
            ) from exc
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to recognise this tokenizer later (wherever its file is):
        the sha256 of the serialised SentencePiece model and the vocabulary size."""
        digest = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()
        return {"sha256": digest, "vocab_size": self.vocab_size, "path": self.path}

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

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids: list[int] = self._sp.encode(text)
        if bos:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (no BOS/EOS); SentencePiece encodes a list in C++ threads."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

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
        """`encode_pair` for many pairs: SentencePiece encodes each list in C++ threads."""
        fulls = self.encode_many([p + r for p, r in zip(prompts, responses, strict=True)])
        with_prompt = [i for i, p in enumerate(prompts) if p]
        prompt_ids = dict(
            zip(with_prompt, self.encode_many([prompts[i] for i in with_prompt]), strict=True)
        )
        out = []
        for i, full in enumerate(fulls):
            ids = prompt_ids.get(i, [])
            common = 0
            limit = min(len(ids), len(full))
            while common < limit and ids[common] == full[common]:
                common += 1
            out.append((full[:common], full[common:]))
        return out
