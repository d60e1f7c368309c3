"""`soft-eval`: every exit of an exported model evaluated.

The code is soft.evaluation.cli_eval; `soft-eval` is its console script."""

from soft.evaluation.cli_eval import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
