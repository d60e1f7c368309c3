"""`soft-plan`: a pipeline split that balances the exit heads.

The code is soft.parallel.cli_plan; `soft-plan` is its console script."""

from soft.parallel.cli_plan import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
