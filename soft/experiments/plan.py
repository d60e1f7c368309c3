"""The runs of the reproduction and the launcher overrides of each: pure data, no side effects.

base (text pretraining) -> sft, soft, extracted_<k> (fine-tuned from base); sft -> ict.
Every fine-tuning run sees the same data, batch, steps, learning rate and seed; only the mode
(and, for the extracted baselines, the depth) differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from soft.config.errors import ConfigError
from soft.experiments.settings import Settings

# Table order and labels of the compared methods.
MODES = ("soft", "sft", "ict", "extracted")
MODE_LABELS = {"soft": "SoFT", "sft": "SFT", "ict": "SFT+ICT", "extracted": "Extracted"}

# Keys the experiment sets per run: overriding them for every run would break the comparison
# (or the run graph), so extra overrides may not touch them; the hint says what to use instead.
RESERVED_KEYS = {
    "soft.mode": "the experiment runs every mode",
    "soft.exit_layers": "exits follow the model depth (see --scale)",
    "model.num_layers": "use --scale",
    "data.format": "fixed per run (text pretraining, alpaca fine-tuning)",
    "data.train_path": "use --corpus (pretraining); fine-tuning uses the built-in tasks",
    "data.valid_path": "validation is held out of the training files",
    "data.tokenizer_path": "the experiment trains its own tokenizer",
    "data.text_field": "fixed by the corpus conversion",
    "data.seq_length": "fixed per run (text windows vs fine-tuning prompts)",
    "train.seed": "use --seed (or --seeds for several; --data-seed for the fine-tuning data)",
    "checkpoint.load_dir": "fixed by the run graph",
    "checkpoint.finetune": "fixed by the run graph",
    "checkpoint.save_dir": "each run saves under <out>/runs/<name>",
    "train.output_dir": "use --out",
    "tracking.tracking_uri": "use --mlflow-uri",
    "tracking.experiment": "use --experiment",
    "tracking.run_name": "runs are named after their mode",
}


@dataclass(frozen=True)
class Layout:
    """Where everything goes under the output directory.

    `base_root`: where the pretrained base, its corpus and its tokenizer live when several
    seeds share one base (<out>/base of a --seeds run); None = under `out` itself.
    """

    out: Path
    base_root: Path | None = None

    @property
    def _base(self) -> Path:
        return self.out if self.base_root is None else self.base_root

    @property
    def corpus(self) -> Path:
        return self._base / "data" / "corpus.jsonl"

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer(self) -> Path:
        return self._base / "tokenizer.model"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def eval_dir(self) -> Path:
        return self.out / "eval"

    @property
    def default_mlflow_uri(self) -> str:
        return f"sqlite:///{(self.out / 'mlflow.db').resolve()}"

    def _runs_of(self, name: str) -> Path:
        return self._base / "runs" if name == "base" else self.runs

    def run_dir(self, name: str) -> Path:
        return self._runs_of(name) / name

    def checkpoints(self, name: str) -> Path:
        return self.run_dir(name) / "checkpoints"

    def log(self, name: str) -> Path:
        return self._runs_of(name) / f"{name}.log"

    def eval_json(self, name: str) -> Path:
        return self.eval_dir / f"{name}.json"


@dataclass(frozen=True)
class RunSpec:
    """One training run: its launcher overrides and how it is evaluated."""

    name: str  # run folder and MLflow run name: base, sft, soft, ict, extracted_<k>
    mode: str  # "base" or one of MODES
    depth: int  # model.num_layers
    overrides: tuple[str, ...]
    loads: str | None  # the run whose final checkpoint it starts from
    eval_exits: tuple[int, ...]  # () = not evaluated (the text-pretrained base)
    iters: int


def check_extra_overrides(extra: list[str]) -> list[str]:
    """`key=value` strings for every run; keys the experiment owns are refused with a hint."""
    for text in extra:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"extra override '{text}': expected key=value, e.g. train.lr=3e-4")
        key = key.strip()
        if key in RESERVED_KEYS:
            raise ConfigError(
                f"extra override '{text}': '{key}' is set by the experiment per run "
                f"({RESERVED_KEYS[key]})"
            )
    return list(extra)


def _list(values: Sequence[int]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def _common(s: Settings, layout: Layout, mlflow_uri: str, experiment: str, seed: int) -> list[str]:
    """Shared by every run: model width, tokenizer, batch, seed, logging, tracking."""
    return [
        f"model.hidden_size={s.hidden_size}",
        f"model.ffn_hidden_size={s.ffn_hidden_size}",
        f"model.num_attention_heads={s.num_attention_heads}",
        f"data.tokenizer_path={layout.tokenizer.resolve()}",
        f"train.micro_batch_size={s.micro_batch_size}",
        f"train.seed={seed}",  # here, as before: a base's recorded overrides stay comparable
        f"train.log_interval={s.log_interval}",
        "train.eval_interval=0",  # one validation pass at the end: steps are precious on CPU
        f"tracking.tracking_uri={mlflow_uri}",
        f"tracking.experiment={experiment}",
    ]


def _float(x: float) -> str:
    """Positional notation: the override parser (YAML) reads '1e-05' as a string."""
    text = f"{x:.12f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _schedule(iters: int, lr: float, warmup: int, batch: int) -> list[str]:
    return [
        f"train.global_batch_size={batch}",
        f"train.train_iters={iters}",
        f"train.lr={_float(lr)}",
        f"train.min_lr={_float(lr / 10)}",
        f"train.lr_warmup_iters={min(warmup, max(0, iters - 1))}",
    ]


def build_plan(
    s: Settings,
    layout: Layout,
    *,
    pretrain: bool,
    mlflow_uri: str,
    experiment: str,
    extra: Sequence[str] = (),
) -> list[RunSpec]:
    """The runs in execution order (each after the run it loads)."""
    L, exits = s.num_layers, s.exit_layers
    finetune_data = [
        "data.format=alpaca",
        f"data.train_path={(layout.data_dir / 'train.json').resolve()}",
        f"data.seq_length={s.finetune_seq_length}",
    ]
    ft_schedule = _schedule(
        s.finetune_iters, s.finetune_lr, s.finetune_warmup, s.finetune_batch_size
    )

    def spec(
        name: str,
        mode: str,
        depth: int,
        own: list[str],
        loads: str | None,
        eval_exits: Sequence[int],
        iters: int,
    ) -> RunSpec:
        load: list[str] = []
        if loads is not None:
            load = [f"checkpoint.load_dir={layout.checkpoints(loads).resolve()}"]
            load.append("checkpoint.finetune=true")
        seed = s.base_seed if mode == "base" else s.seed
        overrides = [
            *_common(s, layout, mlflow_uri, experiment, seed),
            f"model.num_layers={depth}",
            *own,
            *load,
            f"train.output_dir={layout.run_dir(name).resolve()}",
            f"tracking.run_name={name}",
            *extra,  # last: they win over the experiment's defaults (reserved keys excepted)
        ]
        return RunSpec(name, mode, depth, tuple(overrides), loads, tuple(eval_exits), iters)

    base = "base" if pretrain else None
    runs: list[RunSpec] = []
    if pretrain:
        text = [
            "soft.mode=sft",  # plain language modelling; every exit still logged
            f"soft.exit_layers={_list(exits)}",
            "data.format=text",
            "data.text_field=text",
            f"data.train_path={layout.corpus.resolve()}",
            f"data.seq_length={s.text_seq_length}",
            *_schedule(s.pretrain_iters, s.pretrain_lr, s.pretrain_warmup, s.pretrain_batch_size),
        ]
        runs.append(spec("base", "base", L, text, None, (), s.pretrain_iters))
    for mode in ("sft", "soft"):
        own = [f"soft.mode={mode}", f"soft.exit_layers={_list(exits)}", *finetune_data]
        runs.append(spec(mode, mode, L, own + ft_schedule, base, exits, s.finetune_iters))
    ict = ["soft.mode=ict", f"soft.exit_layers={_list(exits)}", *finetune_data, *ft_schedule]
    runs.append(spec("ict", "ict", L, ict, "sft", exits, s.finetune_iters))
    # Deepest first: with runs side by side, the longest left for last would run alone.
    for k in sorted(s.extracted_depths, reverse=True):
        # With a base, `extracted` takes its first k layers; without one (--no-pretrain) a
        # k-layer model from a random init trained on its last layer is the same baseline,
        # and `extracted` refuses to run without a checkpoint to cut.
        mode = "extracted" if pretrain else "sft"
        own = [f"soft.mode={mode}", "soft.exit_layers=null", *finetune_data, *ft_schedule]
        runs.append(spec(f"extracted_{k}", "extracted", k, own, base, (k,), s.finetune_iters))
    return runs
