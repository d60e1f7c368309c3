"""How an example becomes the token ids the model reads: ONE renderer for training samples,
`eval_exits` and `generate`, so all three see the same ids.

Two prompt templates (`data.prompt_template`, `--prompt-template`):

- `alpaca` (default, base models): the data format's own prompt text (the Stanford Alpaca
  prompt; the closed-book QA prompt for TriviaQA), then the response. Ids: [BOS] + prompt +
  response + [EOS]; the loss is on the response and EOS.
- `chat`: the tokenizer's own chat template (`apply_chat_template`). An Alpaca record is one
  user turn (instruction, a blank line, input) and one assistant turn; a messages record
  (`{"messages": [{"role", "content"}, ...]}`) is rendered as it is. The loss is on every
  assistant turn, its end-of-turn token included; every system and user token, and the
  template's scaffolding before each assistant turn's content, is masked.

Finding the assistant tokens in a rendered chat (`_chat_targets`): a template with
`{% generation %}` blocks marks them itself, and transformers returns that mask
(`return_assistant_tokens_mask`, as TRL's assistant-only loss uses). Most released templates
have no such blocks, so the fallback renders the conversation prefix by prefix, as OpenRLHF's
multi-turn SFT does: assistant turn i's text runs from the end of `messages[:i]` rendered with
the generation prompt to the end of `messages[:i + 1]` rendered, both of which must be prefixes
of the whole conversation's text. The spans are found on the text, then mapped to the tokens of
the ONE tokenisation of the whole text through the tokenizer's character offsets (what
transformers does with the `{% generation %}` spans), rather than by tokenising each prefix and
diffing ids: a BPE merge across a turn boundary would make such a diff disagree with the ids
actually trained. Such a boundary is detected and refused instead, and so is a template that
does not render prefixes consistently (e.g. Qwen3's, which drops earlier turns' reasoning:
give it `{% generation %}` blocks). Whitespace after a turn's end token (ChatML's newline after
`<|im_end|>`) is the next turn's scaffolding and is not trained.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

from soft.config.errors import ConfigError
from soft.data.tokenizer import HFTokenizer, Tokenizer, split_at_prompt

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TRIVIAQA_PROMPT = "Answer the following question.\nQuestion: {question}\nAnswer:"

PromptTemplate = Literal["alpaca", "chat"]
PROMPT_TEMPLATES = ("alpaca", "chat")
ROLES = ("system", "user", "assistant")
Message = dict[str, str]
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # as transformers detects it


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt; the response follows it directly."""
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def triviaqa_prompt(question: str) -> str:
    """Closed-book QA prompt; the target answer follows after a space."""
    return TRIVIAQA_PROMPT.format(question=question)


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class PlainExample:
    """A prompt in its format's own template and the response after it (None: a prompt to
    generate from)."""

    prompt: str
    response: str | None = None


@dataclass(frozen=True)
class ChatExample:
    """A conversation. Ending with an assistant turn: trained / scored; ending with another
    role: a prompt to generate the next assistant turn from."""

    messages: tuple[Message, ...]


Example = PlainExample | ChatExample


# A literal template fixes the kind of example (builtin's chat records read .messages).
@overload
def instruction_example(
    template: Literal["alpaca"], instruction: str, input: str = "", output: str | None = None
) -> PlainExample: ...
@overload
def instruction_example(
    template: Literal["chat"], instruction: str, input: str = "", output: str | None = None
) -> ChatExample: ...
@overload
def instruction_example(
    template: PromptTemplate, instruction: str, input: str = "", output: str | None = None
) -> Example: ...
def instruction_example(
    template: PromptTemplate, instruction: str, input: str = "", output: str | None = None
) -> Example:
    """An Alpaca record (instruction, optional input, output) in `template`."""
    if template == "alpaca":
        return PlainExample(alpaca_prompt(instruction, input), output)
    user = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    return _turns(user, output)


def question_example(template: PromptTemplate, question: str, answer: str | None = None) -> Example:
    """A TriviaQA question and its target alias in `template`."""
    if template == "alpaca":
        return PlainExample(triviaqa_prompt(question), None if answer is None else " " + answer)
    return _turns(question, answer)


def text_prompt(template: PromptTemplate, text: str) -> Example:
    """What `generate --prompt TEXT` feeds: the text as it is (alpaca), or one user turn with
    the template's generation prompt (chat)."""
    return PlainExample(text) if template == "alpaca" else _turns(text, None)


def _turns(user: str, assistant: str | None) -> ChatExample:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return ChatExample(tuple(messages))


def check_messages(messages: object) -> str | None:
    """What is wrong with a messages list (None when it is fine): a non-empty list of
    {"role", "content"} with string content, roles from ROLES, at least one assistant turn,
    none of them first (its generation prompt needs a turn before it)."""
    if not isinstance(messages, list) or not messages:
        return 'field \'messages\' must be a non-empty list of {"role", "content"} objects'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"field 'messages' item {i} must be an object, got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return (
                f"field 'messages' item {i}: role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            return f"field 'messages' item {i}: content must be a string, got {content!r:.60}"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "field 'messages' has no assistant turn to train on"
    if roles[0] == "assistant":
        return "field 'messages' starts with an assistant turn; a user or system turn comes first"
    return None


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Rendered:
    """`ids`: the whole example as the model reads it. `targets`: [start, end) ranges of ids
    the loss is on (empty for a generation prompt). `prompt_ids`: what generation is fed to
    produce the last target (the ids before it; everything for a generation prompt)."""

    ids: list[int]
    targets: list[tuple[int, int]]
    prompt_ids: list[int]


class RenderError(ValueError):
    """An example the template cannot render as training needs. `index`: which example of a
    `render_many` call (callers turn it into a file line or dataset row)."""

    index: int = 0


def render(tokenizer: Tokenizer, example: Example) -> Rendered:
    """The ids of one example (training, evaluation and generation all come here)."""
    (rendered,) = render_many(tokenizer, [example])
    return rendered


def render_many(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[Rendered]:
    """`render` of each example; plain examples are tokenised in one batch call."""
    plain = [(i, e) for i, e in enumerate(examples) if isinstance(e, PlainExample)]
    rendered = _render_plain(tokenizer, [e for _, e in plain])
    out = {i: r for (i, _), r in zip(plain, rendered, strict=True)}
    for i, example in enumerate(examples):
        if isinstance(example, ChatExample):
            try:
                out[i] = _render_chat(chat_tokenizer(tokenizer), example.messages)
            except RenderError as exc:
                exc.index = i
                raise
    return [out[i] for i in range(len(examples))]


def _render_plain(tokenizer: Tokenizer, examples: Sequence[PlainExample]) -> list[Rendered]:
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompts = tokenizer.encode_many([e.prompt for e in examples])
    scored = [i for i, e in enumerate(examples) if e.response is not None]
    fulls = tokenizer.encode_many(
        [examples[i].prompt + (examples[i].response or "") for i in scored]
    )
    out = [Rendered(bos + p, [], bos + p) for p in prompts]
    for i, full in zip(scored, fulls, strict=True):
        prompt_part, response = split_at_prompt(prompts[i], full)
        ids = [*bos, *prompt_part, *response, tokenizer.eos_id]
        out[i] = Rendered(ids, [(len(bos) + len(prompt_part), len(ids))], bos + prompts[i])
    return out


def chat_tokenizer(tokenizer: Tokenizer, key: str = "data.prompt_template") -> HFTokenizer:
    """`tokenizer` when it has a chat template; else a ConfigError naming `key`."""
    if not isinstance(tokenizer, HFTokenizer):
        where = (
            "the model folder has no tokenizer.json"
            if key.startswith("--")
            else "point data.tokenizer_path at the model's folder or tokenizer.json"
        )
        raise ConfigError(
            f"{key}=chat needs a Hugging Face tokenizer with a chat template; "
            f"'{tokenizer.path}' is a SentencePiece model (no chat template): {where}"
        )
    if not tokenizer.chat_template:
        raise ConfigError(
            f"{key}=chat: tokenizer '{tokenizer.path}' has no chat template (a base model's "
            f"tokenizer?); use {key}=alpaca, or an instruct model's tokenizer"
        )
    return tokenizer


def _chat_text(tokenizer: HFTokenizer, messages: Sequence[Message], generation: bool) -> str:
    try:
        return tokenizer.hf.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation
        )
    except Exception as exc:  # jinja's TemplateError, or raise_exception() in the template
        raise RenderError(f"the chat template refused the conversation ({exc})") from exc


def _render_chat(tokenizer: HFTokenizer, messages: Sequence[Message]) -> Rendered:
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not messages or messages[-1]["role"] != "assistant":  # a prompt to generate from
        ids = tokenizer.encode_many([_chat_text(tokenizer, messages, True)])[0]
        return Rendered(ids, [], ids)
    if _GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        ids, targets = _generation_block_targets(tokenizer, messages)
    else:
        ids, targets = _prefix_targets(tokenizer, messages, assistant)
    if len(targets) != len(assistant) or any(start >= end for start, end in targets):
        raise RenderError(
            f"found {len(targets)} assistant spans for {len(assistant)} assistant turns: an empty "
            "assistant turn, or a template that does not render every turn"
        )
    # The last turn's generation prompt, tokenised alone, must be exactly the ids training
    # puts before that turn: generation then continues the sequence the model was trained on.
    prompt_ids = tokenizer.encode_many([_chat_text(tokenizer, messages[: assistant[-1]], True)])[0]
    if ids[: len(prompt_ids)] != prompt_ids or len(prompt_ids) > targets[-1][0]:
        raise RenderError(
            "the chat template's generation prompt does not end on a token boundary of the "
            "rendered conversation, so generation would not see the ids training saw"
        )
    return Rendered(ids, targets, prompt_ids)


def _generation_block_targets(
    tokenizer: HFTokenizer, messages: Sequence[Message]
) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        out = tokenizer.hf.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:
        raise RenderError(f"the chat template refused the conversation ({exc})") from exc
    return list(out["input_ids"]), _runs(out["assistant_masks"])


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of 1s."""
    spans, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _prefix_targets(
    tokenizer: HFTokenizer, messages: Sequence[Message], assistant: Sequence[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    full = _chat_text(tokenizer, messages, False)
    ids, char_to_token = tokenizer.encode_with_offsets(full)
    targets = []
    for i in assistant:
        before = _chat_text(tokenizer, messages[:i], True)
        through = _chat_text(tokenizer, messages[: i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise RenderError(
                f"the chat template renders the turns before assistant message {i} differently "
                "depending on what follows them (it rewrites earlier turns), so the assistant "
                "turns cannot be found by rendering prefixes; use a template with "
                "{% generation %} blocks"
            )
        start, end = len(before), len(through.rstrip())
        first = next((t for c in range(start, end) if (t := char_to_token(c)) is not None), None)
        last = next(
            (t for c in range(end - 1, start - 1, -1) if (t := char_to_token(c)) is not None), None
        )
        if first is None or last is None:
            raise RenderError(f"assistant turn {i} renders to no token")
        if start > 0 and char_to_token(start - 1) == first:
            raise RenderError(
                f"a token straddles the start of assistant turn {i} (its template text and its "
                "content merge into one token), so the turn's first token cannot be trained alone"
            )
        targets.append((first, last + 1))
    return ids, targets
