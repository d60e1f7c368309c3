"""`soft-make-builtin-data`: the built-in tokenizer and task files.

The code is soft.data.cli_builtin; `soft-make-builtin-data` is its console script."""

from soft.data.cli_builtin import main

if __name__ == "__main__":  # not on import: spawned child processes re-import __main__
    raise SystemExit(main())
