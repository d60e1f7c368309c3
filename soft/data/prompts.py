"""Prompt templates shared by training data and evaluation, so both see the same text."""

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


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt; the response follows it directly."""
    if input and input.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def triviaqa_prompt(question: str) -> str:
    """Closed-book QA prompt; the target answer follows after a space."""
    return TRIVIAQA_PROMPT.format(question=question)
