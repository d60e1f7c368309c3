"""`soft-export`: megatron-core checkpoint -> HF folder.

The code is soft.conversion.cli_export; `soft-export` is its console script."""

from soft.conversion.cli_export import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
