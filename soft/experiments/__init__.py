"""Experiments built from the project's own tools: the SoFT paper's comparison at small scale.

`reproduce(Options(...))` pretrains a base model on a text corpus, fine-tunes it with SoFT, SFT,
SFT+ICT and as extracted sub-models (each a launcher subprocess), evaluates every exit and
writes the comparison (tables, win rates, plot, MLflow). With `Options(seeds=[...])` it runs
once per seed from one shared base and aggregates the seeds (seeds.py, aggregate.py).
CLI: tools/reproduce_paper.py.
"""

from soft.experiments.reproduce import Options, reproduce
from soft.experiments.settings import Settings, make_settings

__all__ = ["Options", "Settings", "make_settings", "reproduce"]
