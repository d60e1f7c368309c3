"""Bad user input: an invalid config key, a bad data file, an unusable checkpoint folder, a run
folder another job holds. The command-line shells print the message (which names the key, file
or line) and exit 2; every other exception is a failure of the job, not of its input."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input a user can fix; the message says what was given and what was expected."""


class ConfigError(InputError):
    """An invalid config key or value, or a file a config key names (the message names both)."""


def exit_status_of(run: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """A console script's status: `run(argv)`'s own, or 2 with one `error:` line on stderr
    when the input is bad (the shells' shared contract, see the module docstring)."""
    try:
        return run(argv)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
