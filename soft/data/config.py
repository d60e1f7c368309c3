"""Data section of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from soft.config.core import option
from soft.config.errors import ConfigError


@dataclass
class DataConfig:
    format: Literal["alpaca", "triviaqa", "messages", "text"] = option(
        "alpaca",
        "Record format of the data files: alpaca (instruction/input/output), "
        'triviaqa (question + answer aliases), messages ({"messages": [{"role", '
        '"content"}, ...]}, roles system/user/assistant, multi-turn; needs '
        "prompt_template=chat) or text (plain language modelling).",
    )
    prompt_template: Literal["alpaca", "chat"] = option(
        "alpaca",
        "How instruction records become text: alpaca = the format's own prompt (the Stanford "
        "Alpaca prompt; TriviaQA's closed-book prompt), for base models; chat = the "
        "tokenizer's chat template (apply_chat_template; an Alpaca record is one user and one "
        "assistant turn), loss on every assistant turn and its end-of-turn token only. chat "
        "needs a Hugging Face tokenizer with a chat template (tokenizer_path).",
    )
    train_path: str | None = option(
        None,
        "Training data: a .json/.jsonl/.parquet file; a local dataset folder (written by "
        "`save_to_disk`, or data files / hub layout that `datasets.load_dataset` reads); or a "
        "Hugging Face hub dataset `hf://OWNER/NAME`. Folders and hub ids take options after "
        "'?': `config` (load_dataset's name), `split` (default train), `revision`; e.g. "
        "`hf://mandarjoshi/trivia_qa?config=rc.nocontext&split=train`. null = the project's "
        "built-in synthetic instruction tasks (needs no files).",
    )
    valid_path: str | None = option(
        None,
        "Validation data, written like train_path (e.g. `hf://tatsu-lab/alpaca?split=test`); "
        "null = hold out `valid_fraction` of the training records.",
    )
    valid_fraction: float = option(
        0.05, "Fraction of training records held out when valid_path is null."
    )
    tokenizer_path: str | None = option(
        None,
        "The model's tokenizer: a SentencePiece tokenizer.model (LLaMA-2); a Hugging Face "
        "tokenizer.json (with its tokenizer_config.json beside it, read by "
        "transformers.AutoTokenizer); or a folder holding either (an HF model folder, an export, "
        "or an import's output; tokenizer.json wins over tokenizer.model). null = the small "
        "SentencePiece tokenizer shipped with the project.",
    )
    seq_length: int = option(96, "Tokens per sample (prompt + response, padded).")
    overlong: Literal["truncate", "drop"] = option(
        "truncate",
        "What to do with samples longer than seq_length: truncate the response or drop the sample.",
    )
    packing: bool = option(
        False,
        "Pack several examples into each sequence of seq_length tokens (first-fit-decreasing, "
        "deterministic, computed once and cached) instead of one padded example per sequence. "
        "No token attends to another example (the local spec: a block-diagonal causal mask; "
        "Transformer Engine: THD sequences with cu_seqlens, untested on GPU so far) and "
        "positions restart at each example, so losses and gradients equal the unpacked ones; "
        "an example longer than seq_length follows data.overlong and is never split. A sample "
        "is then a pack: batch sizes count packs.",
    )
    answer_alias_index: int = option(
        0, "TriviaQA: which answer alias is the training target (0 = the first)."
    )
    text_field: str = option("text", "Plain-text format: the record field holding the document.")
    builtin_num_samples: int = option(2000, "Built-in synthetic tasks: number of training records.")
    cache_dir: str | None = option(
        None,
        "Where tokenised data files and datasets are cached (keyed by the data's checksum, the "
        "tokenizer's kind and checksum, seq_length, the format options and the prompt template; "
        "rank 0 tokenises, the other "
        "ranks read the memory-mapped result). Should be visible to every node. null = "
        "$SOFT_CACHE_DIR, else ~/.cache/soft/tokenized.",
    )

    def validate(self, prefix: str = "data") -> None:
        if self.seq_length < 8:
            raise ConfigError(
                f"config key '{prefix}.seq_length': expected >= 8, got {self.seq_length}"
            )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(
                f"config key '{prefix}.valid_fraction': expected 0 <= value < 1, got {self.valid_fraction}"
            )
        if self.answer_alias_index < 0:
            raise ConfigError(f"config key '{prefix}.answer_alias_index': expected >= 0")
        if self.builtin_num_samples < 1:
            raise ConfigError(f"config key '{prefix}.builtin_num_samples': expected >= 1")
        if self.format == "messages" and self.prompt_template != "chat":
            raise ConfigError(
                f"config key '{prefix}.format' is 'messages', which only the tokenizer's chat "
                f"template renders: set '{prefix}.prompt_template' to chat"
            )
        if self.format == "text" and self.prompt_template == "chat":
            raise ConfigError(
                f"config key '{prefix}.prompt_template' is 'chat' but '{prefix}.format' is "
                "'text' (plain documents have no turns to template); use prompt_template=alpaca"
            )
        if self.train_path is None and self.format != "alpaca":
            raise ConfigError(
                f"config key '{prefix}.train_path' is null (built-in tasks, Alpaca format) but "
                f"'{prefix}.format' is '{self.format}'; set train_path or format=alpaca"
            )
