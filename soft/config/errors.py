"""Bad user input: an invalid config key, a bad data file, an unusable checkpoint folder, a run
folder another job holds. The command-line shells print the message (which names the key, file
or line) and exit 2; every other exception is a failure of the job, not of its input."""


class InputError(ValueError):
    """Bad input a user can fix; the message says what was given and what was expected."""


class ConfigError(InputError):
    """An invalid config key or value, or a file a config key names (the message names both)."""
