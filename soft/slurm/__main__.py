"""Helpers for launchers/slurm/*.sbatch (bash cannot parse the config or JSON).

python -m soft.slurm output-dir [--config FILE] [key=value ...]  print the absolute train.output_dir
python -m soft.slurm exit-reason OUTPUT_DIR    print the reason (soft.runs.status), missing or invalid
python -m soft.slurm clear-exit-status OUTPUT_DIR              remove a previous job's status
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soft.config.errors import InputError
from soft.runs.status import clear_stop_status, read_stop_reason


def _output_dir(config: str | None, overrides: list[str]) -> str:
    # Imported here: the full config schema pulls in torch, the other commands must stay fast.
    from soft.config.root import load_config

    # Loading also validates: a bad config fails here, before torchrun starts on every node.
    cfg = load_config(config, overrides)
    return str(Path(cfg.train.output_dir).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m soft.slurm", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    out = sub.add_parser("output-dir", help="print the resolved, absolute train.output_dir")
    out.add_argument("--config", default=None, help="YAML config (default: the embedded job)")
    out.add_argument("overrides", nargs="*")
    reason = sub.add_parser("exit-reason", help="print the reason in OUTPUT_DIR/exit_status.json")
    reason.add_argument("output_dir")
    clear = sub.add_parser("clear-exit-status", help="remove OUTPUT_DIR/exit_status.json")
    clear.add_argument("output_dir")
    args = parser.parse_args(argv)

    if args.command == "output-dir":
        try:
            print(_output_dir(args.config, args.overrides))
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "exit-reason":
        print(read_stop_reason(args.output_dir))
    else:
        clear_stop_status(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
