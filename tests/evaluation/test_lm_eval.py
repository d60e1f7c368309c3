"""Exports evaluated by lm-evaluation-harness (`lm_eval --model hf`): the full model and an
`--exit-layer k` sub-model export run a local loglikelihood task, and every example's
log-likelihood equals eval_exits' loss on the same text (exit k of the full export).

Tolerance: fp32 on CPU, abs 1e-4 on per-example sums of ~10-40 nats (lm-eval pads its batches,
eval_exits runs one unpadded sequence: summation order differs; observed < 1e-5).
Skipped without the `eval` extra (`pip install -e .[eval]`; scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from soft.conversion import ExportRequest, convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from soft.data.prompts import PlainExample, triviaqa_prompt  # noqa: E402
from soft.evaluation import exit_nll, load_exported_model, tokenize_example  # noqa: E402
from soft.evaluation.records import EvalExample  # noqa: E402
from tests.conversion.helpers import BUILTIN_TOKENIZER, make_hf_model  # noqa: E402

TASK = "soft_qa_loglikelihood"
K = 2


def _task(folder: Path, data: Path) -> Path:
    """A local lm-eval task: closed-book QA prompts as in eval_exits' triviaqa format, the
    answer (with its leading space) as the continuation, nothing inserted between them."""
    folder.mkdir()
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{target}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def _examples() -> list[EvalExample]:
    pairs = [(3, 4), (12, 30), (7, 7), (41, 58), (100, 23), (5, 9)]
    return [
        EvalExample(
            PlainExample(triviaqa_prompt(f"What is {a} plus {b}?"), f" {a + b}"), [str(a + b)]
        )
        for a, b in pairs
    ]


def _lm_eval_loglikelihoods(model_dir: Path, tasks: Path) -> list[float]:
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(s["resps"][0][0][0]) for s in samples]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lm_eval")
    make_hf_model(tmp / "hf", vocab=512, layers=3, tokenizer=BUILTIN_TOKENIZER)
    meg = convert_hf_to_megatron(tmp / "hf", tmp / "meg", dtype="fp32", progress=False)
    out = {}
    for name, exit_layer in (("full", None), (f"exit{K}", K)):
        out[name] = convert_megatron_to_hf(
            ExportRequest(meg, tmp / name, exit_layer=exit_layer, tokenizer=BUILTIN_TOKENIZER,
                          progress=False)
        )  # fmt: skip
    data = tmp / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "target": e.target}) + "\n"
                            for e in _examples()))  # fmt: skip
    out["tasks"] = _task(tmp / "tasks", data)
    return out


def test_lm_eval_loglikelihoods_equal_eval_exits_losses(exports):
    full = load_exported_model(exports["full"], device="cpu", dtype="float32")
    reference: dict[int, list[float]] = {K: [], 3: []}
    for example in _examples():
        tokenized = tokenize_example(full.tokenizer, example)
        # eval_exits scores the answer and the EOS after it; lm-eval the answer only.
        ids, n = tokenized.loss_ids[:-1], tokenized.num_target - 1
        for k, (nll, count) in exit_nll(full.model, ids, n, [K, 3]).items():
            assert count == n
            reference[k].append(-nll)
    got_full = _lm_eval_loglikelihoods(exports["full"], exports["tasks"])
    got_exit = _lm_eval_loglikelihoods(exports[f"exit{K}"], exports["tasks"])
    assert got_full == pytest.approx(reference[3], abs=1e-4)
    assert got_exit == pytest.approx(reference[K], abs=1e-4)
    assert (
        max(abs(a - b) for a, b in zip(got_full, got_exit, strict=True)) > 0.1
    )  # different models
