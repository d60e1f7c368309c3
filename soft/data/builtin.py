"""Built-in synthetic instruction tasks and the small tokenizer trained on them.

They are the default dataset: a fresh clone trains with no data files. Every task has a short
answer that can be checked by exact string match, so the same generator also yields held-out
evaluation splits (`generate_records(seed, count, split="test")`).
"""

from __future__ import annotations

import io
import random
import string
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path

from soft.config.errors import ConfigError
from soft.data.prompts import alpaca_prompt, instruction_example

Record = dict[str, str]
# A task draws (instruction, input, output) from the generator it is given.
TaskFn = Callable[[random.Random], tuple[str, str, str]]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_TOKENIZER_PATH = ASSETS_DIR / "builtin_tokenizer.model"
TOKENIZER_VOCAB_SIZE = 512
# The corpus the shipped tokenizer is trained on; changing these changes the shipped model,
# so regenerate it with tools/make_builtin_data.py (a test checks they match).
TOKENIZER_CORPUS_SEED = 1234
TOKENIZER_CORPUS_RECORDS = 3000

_LETTERS = string.ascii_lowercase


def _word(rng: random.Random, low: int = 3, high: int = 8) -> str:
    """A random lowercase letter string: a near-infinite domain keeps held-out splits unseen."""
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(low, high)))


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} plus {b}?", "", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", "", str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Reverse the letters of the word.", word, word[::-1]


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Write the word in uppercase letters.", word, word.upper()


def _next_letter(rng: random.Random) -> tuple[str, str, str]:
    i = rng.randrange(len(_LETTERS) - 1)
    return f"Which letter comes after '{_LETTERS[i]}' in the alphabet?", "", _LETTERS[i + 1]


def _count_letters(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng, 2, 9)
    return "How many letters are in the word?", word, str(len(word))


def _sort_three(rng: random.Random) -> tuple[str, str, str]:
    nums = [rng.randint(0, 99) for _ in range(3)]
    text = ", ".join(str(n) for n in nums)
    return "Sort the numbers in ascending order.", text, ", ".join(str(n) for n in sorted(nums))


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    return f"Which number is larger, {a} or {b}?", "", str(max(a, b))


def _first_letter(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "What is the first letter of the word?", word, word[0]


TASKS: dict[str, TaskFn] = {
    "add": _add,
    "subtract": _subtract,
    "reverse": _reverse,
    "uppercase": _uppercase,
    "next_letter": _next_letter,
    "count_letters": _count_letters,
    "sort_three": _sort_three,
    "larger": _larger,
    "first_letter": _first_letter,
}


def record_key(record: Record) -> tuple[str, str]:
    """What makes two records the same question (the output follows from it)."""
    return record["instruction"], record.get("input", "")


def _stream(seed: int, split: str, tasks: Sequence[str]) -> Iterator[Record]:
    # A string seed is hashed deterministically (sha512), unlike hash(); the split name
    # gives train/valid/test independent streams for the same seed.
    rng = random.Random(f"soft-builtin:{split}:{seed}")
    while True:
        instruction, input_, output = TASKS[rng.choice(tasks)](rng)
        yield {"instruction": instruction, "input": input_, "output": output}


def generate_records(
    seed: int,
    count: int,
    *,
    split: str = "train",
    tasks: Sequence[str] | None = None,
    exclude: Collection[tuple[str, str]] = (),
) -> list[Record]:
    """`count` Alpaca records `{"instruction", "input", "output"}`, deterministic in its inputs.

    `exclude` holds `record_key`s (e.g. of the training set) that must not appear, which makes
    a split truly held out; repeats within the result are skipped too. Tasks with a small
    domain (next_letter has 25 questions) may run out of unseen questions: generation stops
    after a bounded number of draws, so the result can then be shorter than `count`.
    """
    names = list(tasks) if tasks is not None else sorted(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown built-in task(s) {unknown}; known: {', '.join(sorted(TASKS))}")
    if count < 0:
        raise ConfigError(f"built-in tasks: count must be >= 0, got {count}")
    if not exclude:
        stream = _stream(seed, split, names)
        return [next(stream) for _ in range(count)]
    seen = set(exclude)
    records: list[Record] = []
    for draws, record in enumerate(_stream(seed, split, names)):
        if len(records) == count or draws >= 20 * count + 1000:
            break
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def generate_conversations(
    seed: int, count: int, *, turns: int = 2, split: str = "train"
) -> list[dict[str, list[dict[str, str]]]]:
    """`count` messages records `{"messages": [...]}` of `turns` built-in tasks each (one user
    and one assistant turn per task), deterministic in its inputs."""
    records = generate_records(seed, count * turns, split=split)
    out = []
    for i in range(count):
        messages: list[dict[str, str]] = []
        for r in records[i * turns : (i + 1) * turns]:
            example = instruction_example("chat", r["instruction"], r["input"], r["output"])
            messages += example.messages
        out.append({"messages": messages})
    return out


def tokenizer_corpus(
    seed: int = TOKENIZER_CORPUS_SEED, count: int = TOKENIZER_CORPUS_RECORDS
) -> list[str]:
    """Lines of prompt + response text, as the model sees them, to train the tokenizer on.

    Split on newlines: SentencePiece treats each input as one sentence, and a newline is
    encoded as the byte piece <0x0A> (as in LLaMA-2) rather than learned.
    """
    lines: list[str] = []
    for rec in generate_records(seed, count, split="tokenizer"):
        text = alpaca_prompt(rec["instruction"], rec["input"]) + rec["output"]
        lines.extend(line for line in text.split("\n") if line.strip())
    return lines


def train_sentencepiece(lines: Iterable[str], out_path: str | Path, vocab_size: int) -> Path:
    """Train a small BPE SentencePiece model on `lines` and write it atomically to `out_path`.

    LLaMA-2-like settings (BPE, byte fallback, digits split, identity normalisation so that
    decode(encode(x)) == x, unk=0 bos=1 eos=2, no pad piece); one thread and no sampling or
    shuffling of the input, so the result is reproducible. Used for the shipped tokenizer and
    for the tokenizers experiments train (soft.experiments)."""
    import sentencepiece as spm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # model_writer rather than model_prefix: the prefix would be stored in the model's
    # trainer spec, so the file's bytes would depend on a temporary path.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. a vocabulary larger than the text supports
        raise ConfigError(f"training a SentencePiece tokenizer failed: {exc}") from exc
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)  # atomic: never a half-written model
    return out_path


def train_builtin_tokenizer(
    out_path: str | Path = BUILTIN_TOKENIZER_PATH, vocab_size: int = TOKENIZER_VOCAB_SIZE
) -> Path:
    """Train the small tokenizer shipped with the project (see train_sentencepiece)."""
    return train_sentencepiece(tokenizer_corpus(), out_path, vocab_size)


# ----------------------------------------------------------------------------- HF tokenizers
# Small Hugging Face tokenizers in the two conventions released chat models use, trained on
# the built-in tasks (offline, seconds): for the tests and the README's chat example, where a
# real model's tokenizer cannot be downloaded.

CHAT_STYLES = ("llama3", "chatml")
HF_TOKENIZER_VOCAB_SIZE = 640
# LLaMA-3's layout: BOS added by the tokenizer, each turn headed by role markers and ended by
# <|eot_id|> (the instruct models' EOS); no pad token.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Qwen's ChatML: no BOS, a default system turn when the conversation has none, turns ended by
# <|im_end|> (the EOS) and a newline; pad <|endoftext|>. `generation_blocks` wraps each
# assistant turn's content and end token in {% generation %} (as TRL's training templates do).
_CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}OPEN{{- message['content'] + '<|im_end|>' }}CLOSE{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chatml_template(generation_blocks: bool = False) -> str:
    if generation_blocks:
        return _CHATML.replace("OPEN", "{% generation %}").replace("CLOSE", "{% endgeneration %}")
    return _CHATML.replace("OPEN", "").replace("CLOSE", "")


_SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>"],
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}  # fmt: skip


def train_hf_tokenizer(
    out_dir: str | Path,
    style: str = "chatml",
    vocab_size: int = HF_TOKENIZER_VOCAB_SIZE,
    generation_blocks: bool = False,
) -> Path:
    """A byte-level BPE (`tokenizers`) trained on the built-in tasks, saved by transformers as
    tokenizer.json + tokenizer_config.json + chat_template.jinja in `out_dir` with the special
    tokens and chat template of `style` (llama3 or chatml, see above). Deterministic."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in CHAT_STYLES:
        raise ConfigError(f"chat style '{style}': expected one of {', '.join(CHAT_STYLES)}")
    specials = _SPECIALS[style]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus as the chat template shows it too, so role names are single tokens.
    corpus = tokenizer_corpus() + ["system user assistant You are a helpful assistant."] * 50
    tok.train_from_iterator(corpus, trainer)
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")
        fast.chat_template = LLAMA3_CHAT_TEMPLATE
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        fast.chat_template = chatml_template(generation_blocks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir
