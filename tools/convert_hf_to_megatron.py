"""`soft-convert-hf`: HF folder -> megatron-core checkpoint.

The code is soft.conversion.cli_import; `soft-convert-hf` is its console script."""

from soft.conversion.cli_import import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
