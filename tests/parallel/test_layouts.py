"""Parallel layouts equal the single-rank run (the harness is tests/parallel/multirank.py).

One subprocess imports megatron-core once and forks every layout's ranks from it. For each
layout (TP2xPP2, TP2xPP2 with sequence parallelism, PP4, DP2xTP2, DP2xPP2 with the distributed optimizer, PP2 interleaved with
virtual pipeline 2 (alone and with DP2), PP2 with an uneven first stage; LoRA adapters at TP2xPP2 with
sequence parallelism (final norm trained) and at PP2xVP2xDP2 with the distributed optimizer,
full recompute and a subset of layers; and at TP2xPP2 the fine-tuning modes ict
(frozen backbone, separate heads on both stages, loaded from an SFT checkpoint) and extracted
(the first 4 layers of an 8-layer checkpoint); the fused exit loss at TP2xPP2 with sequence
parallelism against the recompute implementation at one rank; full activation recompute
(uniform at TP2xPP2, block at PP2xVP2) against a run without it; bf16 at TP2xPP2 with sequence
parallelism against bf16 at one rank) and its exit plan (exits inside stages,
on a stage boundary, several on one stage, none on some stages, two head replicas on one
rank), against a 1-rank run of the same config:
- per-exit losses: rel 1e-5 (observed: equal, or ~1e-7 where data-parallel sums reorder);
- every parameter's gradient, assembled from all shards by checkpoint key, every element
  owned exactly once: rtol 1e-4, atol 1e-7 (observed max abs diff 3e-8);
- the clipped global gradient norm (the shared head counted once): rel 1e-5;
- parameters after 3 Adam steps: rtol 1e-4, atol 2e-6 (observed 2e-7);
- head replicas on different stages (and chunks) bit-identical after the steps;
- bf16: every model parameter is bf16 in both runs; losses and the gradient norm rel 2e-3
  (observed 4e-5), each gradient and parameter tensor ||got - ref|| / ||ref|| < 2e-2 (bf16
  keeps 8 mantissa bits; observed 6e-3 and 8e-3).
Model families: tied embeddings (the exit heads are the embedding matrix; its copies on the
first stage, the last stage and every exit stage receive the sum of all gradients) at
TP2xPP2, PP4 with an exit on every stage, PP2 interleaved with virtual pipeline 2 and ict on a
tied model at TP2xPP2, and q/k/v biases + q/k norms + an explicit head_dim + llama3 RoPE
scaling at TP2xPP2, with the same tolerances (observed as above) and every copy of the tied
matrix bit-identical; `families_tp2_pp2` imports a tiny HF model of every family
(tests/parallel/family_checks.py): per-exit logits at TP2xPP2 equal transformers' (atol 2e-5, observed 4.4e-6),
and 6 SoFT steps lower every exit's loss.
And checkpoints: saved at TP2xPP2 and loaded at TP1xPP1 (and the reverse; also for a tied
model); an ict run saved at
TP2xPP2 and loaded at TP1xPP1; an adapter checkpoint saved at TP2xPP2 with SP (adapters
only, the base read from its own checkpoint) and resumed at one rank; with the distributed optimizer (fully_reshardable, the default)
resumed at DP2xPP2 and resharded to DP2xTP2 and to one rank, and (dp_reshardable) to DP1xPP2:
the next two steps' losses equal the unbroken run's (observed exactly, or 6e-8 where the DP sum
reorders). The second step follows an Adam update from the loaded moments and step count.
The gradient reduction overlapped with backward (overlap_grad_reduce) at DP2xPP2: the head
replica, whose gradient the fused exit loss writes into main_grad, reports it to DDP
(soft.compat.wgrad) and the run equals the one-rank run without overlap.
Packed data (data.packing) at TP2xPP2+SP, PP2xVP2, TP2xPP2xVP2+SP, PP4, DP2xTP2 with
recompute, DP2xPP2 with the distributed optimizer, bf16 at TP2xPP2+SP (bf16 tolerances), ict
and extracted, with the same tolerances. Transformer Engine's THD path (packed batches as
[1, b*s] streams with PackedSeqParams) at TP2xPP2+SP and at PP2xVP2 with block recompute, its
attention stood in for by the local one per cu_seqlens sequence
(tests/training/thd_reference.py), against the mask path at one rank (observed: losses 2e-7
relative, gradients 4e-8 absolute), every rank's layers seen taking THD streams.
Last, the golden loss curve (tests/training/golden.py) at TP2xPP2.
"""

from __future__ import annotations

import pytest

from tests.launcher_utils import run_harness, scenario_failure, selected_names
from tests.parallel.multirank import GOLDEN, RESHARDS, SCENARIOS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(request, tmp_path_factory) -> dict:
    """One harness launch for the layouts selected (`-k tp2_pp2` runs those only)."""
    out = tmp_path_factory.mktemp("multirank")
    names = selected_names(request, test_layout_matches_single_rank)
    return run_harness("tests.parallel.multirank", out, *names, timeout=1500)


# The first selected test carries the harness launch (its fixture): its own limit, not the
# per-test 900 s.
@pytest.mark.timeout(1600)
@pytest.mark.parametrize("name", [*SCENARIOS, *RESHARDS, *GOLDEN])
def test_layout_matches_single_rank(report, name):
    result = report[name]
    if not result["ok"]:
        pytest.fail(scenario_failure(result), pytrace=False)
