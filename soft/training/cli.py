"""The training command: `torchrun launchers/pretrain_soft.py [--config FILE] [key=value ...]`
(the script is a thin shell over `main` here; `torchrun --module soft.training.cli` is the same).

With no --config, the embedded default runs: a tiny model on the project's built-in
instruction tasks and tokenizer (no files needed). Overrides are dotted config keys, e.g.
`soft.exit_layers=[2,4] train.train_iters=50`; see README.md for the reference.

Exit status: 0 finished or stopped cleanly (exit_status.json says which), 1 a halted run (a
NaN/inf step, too many skipped updates) or a crash, 2 bad input (config, data, checkpoint, a
busy run folder).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from soft.config.errors import ConfigError


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # megatron-core logs every parameter and its optimizer config at INFO; keep our lines readable.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        from soft.config.root import load_config

        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        _error(str(exc))
        return 2
    from soft.parallel.setup import destroy_distributed
    from soft.training.loop import TrainingHalted, run_training

    try:
        run_training(cfg)
    except ConfigError as exc:  # bad input: config, data, checkpoint, a busy run folder
        _error(str(exc))
        return 2
    except TrainingHalted as exc:  # a NaN/inf step or too many skipped updates
        _error(str(exc))
        return 1
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
