"""Sizes, steps and learning rates of the paper reproduction, as a function of `--scale`.

The defaults (scale 1) are sized for a 2-core CPU: the whole experiment (pretraining, six
fine-tuning runs two at a time, evaluation) took 27 minutes on a shared 2-core machine, and
the fine-tuned full models reached about 50% exact match on the held-out prompts.
`--scale S` multiplies, for a bigger machine:

- model depth: `num_layers` = 8·S rounded to a multiple of 4 (at least 4), so that the
  extracted depths L/4, L/2, 3L/4 are whole layers;
- model width: `hidden_size` = 128·S rounded to a multiple of 64, heads = hidden / 32 (the
  head dimension stays 32), `ffn_hidden_size` = 2.75·hidden rounded to a multiple of 16;
- the steps of every training run (pretraining, fine-tuning, ICT);
- the number of fine-tuning training records and of held-out test prompts;
- the tokenizer vocabulary (1024·S rounded to a multiple of 128, at most 8192).

Batch sizes, sequence lengths, learning rates, the seeds and the fine-tuning tasks do not change
with the scale. Seeds (none changes with the scale): `seed` is every training run's
`train.seed` (init, data order, dropout), `data_seed` draws the fine-tuning records and the
held-out prompts, `base_seed` is the pretraining run's `train.seed` (it differs from `seed`
only when several seeds share one pretrained base: see soft/experiments/seeds.py). Tasks: by default the built-in tasks that the default model learns within its
steps (`DEFAULT_TASKS`; on the full mix of nine, reversal, upper-casing and arithmetic dilute
the few hundred steps and the full model stays near 10% exact match, mostly from guessing);
`--tasks all` uses every built-in task, for bigger runs.
Exit layers: every layer below 16 layers; from 16 every (L // 8)-th layer (about eight
exits), the last layer always included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from soft.config.errors import ConfigError
from soft.data.builtin import TASKS

HEAD_DIM = 32
MAX_VOCAB = 8192
# Built-in tasks (soft/data/builtin.py) a 2M-parameter model makes headway on in a few hundred
# steps; all need the prompt's numbers or letters read back, so depth matters. Measured at the
# defaults: the full mix of nine stays near 10% exact match (guessing); first_letter stays near
# 0 (the BPE pieces hide single letters); next_letter has no held-out questions (all 25 land
# in the training split).
DEFAULT_TASKS = ("larger", "count_letters", "sort_three")


@dataclass(frozen=True)
class Settings:
    """Everything that sizes one reproduction; recorded in results.json and MLflow."""

    scale: float
    mini: bool
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int  # tokenizer pieces
    exit_layers: list[int]
    extracted_depths: list[int]
    text_seq_length: int  # pretraining windows
    finetune_seq_length: int  # prompt + answer of the built-in tasks (at most ~75 tokens)
    micro_batch_size: int
    pretrain_batch_size: int  # global batch of text windows
    pretrain_iters: int
    pretrain_lr: float
    pretrain_warmup: int
    finetune_batch_size: int  # global batch of every fine-tuning run (ICT included)
    finetune_iters: int
    finetune_lr: float
    finetune_warmup: int
    num_train: int  # fine-tuning records
    num_test: int  # held-out prompts scored per exit
    max_new_tokens: int  # longest built-in answer: ~11 tokens ("12, 45, 78" with split digits)
    tasks: tuple[str, ...] = DEFAULT_TASKS  # built-in fine-tuning tasks
    corpus_limit: int | None = None  # pretraining records used (None = the whole corpus)
    seed: int = 42  # train.seed of the fine-tuning runs (the paper's seed)
    data_seed: int = 42  # draws the fine-tuning records and held-out test prompts
    base_seed: int = 42  # train.seed of the pretraining run
    log_interval: int = 10

    def as_params(self) -> dict[str, object]:
        return asdict(self)


def _round_to(value: float, multiple: int, minimum: int) -> int:
    return max(minimum, int(round(value / multiple)) * multiple)


def exit_layers_for(num_layers: int) -> list[int]:
    """Every layer of a small model; every (L // 8)-th of a deeper one; the last always."""
    stride = max(1, num_layers // 8)
    layers = list(range(stride, num_layers + 1, stride))
    if layers[-1] != num_layers:
        layers.append(num_layers)
    return layers


def extracted_depths_for(num_layers: int) -> list[int]:
    """The 1/4, 1/2 and 3/4 depths (the extracted sub-model baselines), distinct, < L."""
    return sorted({max(1, num_layers * i // 4) for i in (1, 2, 3)} - {num_layers})


def make_settings(
    scale: float = 1.0,
    mini: bool = False,
    tasks: Sequence[str] | None = None,
    seed: int = 42,
    data_seed: int | None = None,
    base_seed: int | None = None,
) -> Settings:
    """The defaults for `scale` (see the module docstring); `mini` = a smoke-test size;
    `tasks` = built-in task names (None = DEFAULT_TASKS); `data_seed` and `base_seed`
    default to `seed`."""
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"--scale: expected a positive number, got {scale}")
    chosen = _check_tasks(DEFAULT_TASKS if tasks is None else tasks)
    data_seed = seed if data_seed is None else data_seed
    base_seed = seed if base_seed is None else base_seed
    _check_seed("seed", seed)
    _check_seed("data_seed", data_seed)
    _check_seed("base_seed", base_seed)
    sized = _mini_settings(scale) if mini else _full_settings(scale)
    return replace(sized, tasks=chosen, seed=seed, data_seed=data_seed, base_seed=base_seed)


def _check_seed(name: str, value: int) -> None:
    # train.seed seeds torch and numpy: numpy takes 0 <= seed < 2**32.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag}: expected an integer in [0, 2**32), got {value!r}")


def _full_settings(scale: float) -> Settings:
    num_layers = _round_to(8 * scale, 4, 4)
    hidden = _round_to(128 * scale, 64, 64)
    steps = lambda n: max(1, int(round(n * scale)))  # noqa: E731
    return Settings(
        scale=scale,
        mini=False,
        num_layers=num_layers,
        hidden_size=hidden,
        ffn_hidden_size=_round_to(2.75 * hidden, 16, 16),
        num_attention_heads=hidden // HEAD_DIM,
        vocab_size=min(MAX_VOCAB, _round_to(1024 * scale, 128, 512)),
        exit_layers=exit_layers_for(num_layers),
        extracted_depths=extracted_depths_for(num_layers),
        text_seq_length=128,
        finetune_seq_length=80,
        micro_batch_size=16,
        pretrain_batch_size=32,
        pretrain_iters=steps(200),
        pretrain_lr=2e-3,
        pretrain_warmup=20,
        # Small batches, many steps: the answers are a few tokens, and the skills (reading
        # numbers and letters back from the prompt) appear after several hundred updates.
        finetune_batch_size=16,
        finetune_iters=steps(800),
        finetune_lr=2e-3,
        finetune_warmup=20,
        num_train=max(100, int(round(4000 * scale))),
        num_test=max(20, int(round(200 * scale))),
        max_new_tokens=16,
    )


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    if not tasks:
        raise ConfigError("--tasks: expected at least one built-in task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}; known: {', '.join(sorted(TASKS))}")
    return tuple(dict.fromkeys(tasks))  # deduplicated, in the given order


def _mini_settings(scale: float) -> Settings:
    """A few steps of a 4-layer model: exercises every mode, exit and file in a few minutes."""
    return Settings(
        scale=scale,
        mini=True,
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=176,
        num_attention_heads=2,
        vocab_size=512,
        exit_layers=exit_layers_for(4),
        extracted_depths=extracted_depths_for(4),
        text_seq_length=64,
        finetune_seq_length=80,
        micro_batch_size=8,
        pretrain_batch_size=8,
        pretrain_iters=3,
        pretrain_lr=2e-3,
        pretrain_warmup=1,
        finetune_batch_size=8,
        finetune_iters=3,
        finetune_lr=2e-3,
        finetune_warmup=1,
        num_train=200,
        num_test=12,
        max_new_tokens=4,
        corpus_limit=400,
        log_interval=1,
    )
