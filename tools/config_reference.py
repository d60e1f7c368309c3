"""`soft-config-reference`: docs/CONFIG.md printed or written.

The code is soft.config.cli_reference; `soft-config-reference` is its console script."""

from soft.config.cli_reference import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
