"""The training command: `torchrun launchers/pretrain_soft.py [--config FILE] [key=value ...]`
(the script is a thin shell over `main` here; `torchrun --module soft.training.cli` is the same).

With no --config, the embedded default runs: a tiny model on the project's built-in
instruction tasks and tokenizer (no files needed). Overrides are dotted config keys, e.g.
`soft.exit_layers=[2,4] train.train_iters=50`; see README.md for the reference.

Exit status: 0 finished or stopped cleanly (exit_status.json says which), 1 a halted run (a
NaN/inf step or validation loss, too many skipped updates), a failed save (a full disk) or a
crash, 2 bad input (config, data, checkpoint, a busy run folder); 128 + the signal when a rank
gives up on a stop (signals.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from soft.config.errors import InputError

if TYPE_CHECKING:
    from soft.config.root import RootConfig
    from soft.training.loop import RunResult
    from soft.training.signals import StopRequest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=None, help="YAML config file (default: the embedded tiny job)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def _error(message: str) -> None:
    """Every rank fails alike; one copy of the message is enough."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)


def _leave_without_teardown(exc: BaseException) -> None:
    """A peer is gone: the process groups' teardown (and their destructors when Python exits)
    can wait on it for many seconds, past torchrun's SIGKILL. The status and MLflow are
    written; only the checkpoint helper process is stopped."""
    from soft.compat import checkpoint_queue

    print(f"error: {exc}", file=sys.stderr)
    checkpoint_queue.restore()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def run_training(cfg: RootConfig, stop: StopRequest | None = None) -> RunResult:
    """One training job, in the order it happens. `stop`: the job's stop request (main keeps
    it until the process groups are gone); None = one for this call."""
    from soft.training.ending import JobEnding
    from soft.training.loop import train
    from soft.training.run import setup
    from soft.training.signals import StopRequest

    if stop is None:
        with StopRequest() as own:
            return run_training(cfg, own)
    run = setup(cfg)  # the run folder, data, model, optimizer; where the run starts
    with JobEnding(run, stop) as tracker:  # MLflow; how an ending by exception is recorded
        return train(run, tracker, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # megatron-core logs every parameter and its optimizer config at INFO; keep our lines readable.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        from soft.training.run_config import load_run_config

        cfg = load_run_config(args.config, args.overrides)
    except InputError as exc:
        _error(str(exc))
        return 2
    from soft.checkpointing.directory import CheckpointSaveFailed
    from soft.parallel.collectives import PeerLost
    from soft.parallel.setup import destroy_distributed
    from soft.training.guards import TrainingHalted
    from soft.training.signals import StopRequest

    # Stop signals are handled from the start to the very end: a SIGTERM while a failing job
    # closes MLflow must not kill it halfway, and a teardown stuck on a dead peer still ends.
    with StopRequest() as stop:
        try:
            run_training(cfg, stop)
        except InputError as exc:  # bad input: config, data, checkpoint, a busy run folder
            _error(str(exc))
            return 2
        except (TrainingHalted, CheckpointSaveFailed) as exc:  # a NaN/inf step, a full disk
            _error(str(exc))
            return 1
        except PeerLost as exc:  # recorded; nothing collective can end now: leave at once
            _leave_without_teardown(exc)
        finally:
            stop.now_doing("leaving (tearing down the process groups)")
            destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
