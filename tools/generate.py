"""`soft-generate`: greedy generation with an exported model.

The code is soft.evaluation.cli_generate; `soft-generate` is its console script."""

from soft.evaluation.cli_generate import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
