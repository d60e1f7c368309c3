"""Can a sub-model export draft for the full export in vLLM's speculative decoding?

vLLM (`speculative_config={"method": "draft_model", "model": DRAFT, ...}`) loads the draft's
config.json through transformers and checks, before any weight is read: a registered
architecture; the same vocabulary size as the target (`SpeculativeConfig.
verify_equal_vocab_size_if_draft_model`); a draft tensor-parallel size of 1 or the target's
(`_verify_and_get_draft_tp`, default: the target's), which must divide the draft's attention
and KV heads; and it caps the draft's context at min(draft, target) max_model_len. It
tokenises with the target's tokenizer. vLLM itself is not installed here (a GPU serving
stack); `draft_problems` checks those fields on CPU, and the greedy-token identity of the two
exports with our own speculative decoding is tested in tests/evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soft.conversion.hf_io import read_hf_config

# Fields that must agree for the draft to read the target's tokens and run at its TP size.
SAME_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "bos_token_id", "eos_token_id", "rms_norm_eps", "head_dim",
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def draft_problems(
    target_dir: str | Path, draft_dir: str | Path, tensor_parallel: int = 1
) -> list[str]:
    """What would stop vLLM from drafting `target_dir` with `draft_dir` at `tensor_parallel`
    (the draft runs at the target's TP size by default); [] when nothing does."""
    target_dir, draft_dir = Path(target_dir), Path(draft_dir)
    target, draft = read_hf_config(target_dir), read_hf_config(draft_dir)
    problems = []  # (read_hf_config has refused families we do not support)
    if target.get("architectures") != draft.get("architectures"):
        problems.append(
            f"architectures: target {target.get('architectures')!r}, "
            f"draft {draft.get('architectures')!r}"
        )
    for key in SAME_FIELDS:
        if _field(target, key) != _field(draft, key):
            problems.append(f"{key}: target {_field(target, key)!r}, draft {_field(draft, key)!r}")
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = _field(draft, key)
        if isinstance(heads, int) and heads % tensor_parallel:
            problems.append(
                f"draft {key}={heads} is not divisible by tensor parallel {tensor_parallel}"
            )
    if int(draft["num_hidden_layers"]) >= int(target["num_hidden_layers"]):
        problems.append(
            f"the draft has {draft['num_hidden_layers']} layers, the target "
            f"{target['num_hidden_layers']}: a draft must be shallower to save time"
        )
    for file in TOKENIZER_FILES:
        a, b = target_dir / file, draft_dir / file
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            problems.append(f"{file} differs: the draft would tokenise differently")
    return problems


def _field(config: dict[str, Any], key: str) -> Any:
    if key == "num_key_value_heads":
        return config.get(key, config.get("num_attention_heads"))
    return config.get(key)
