"""The one exception type for bad user input: config keys, data files, checkpoint folders."""


class ConfigError(ValueError):
    """Raised for invalid configuration or input; the message names the key, file or line."""
