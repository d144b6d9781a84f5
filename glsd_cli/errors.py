"""User-facing errors: the CLI turns these into one clear line and exit code 2."""


class GlsdError(Exception):
    """An error caused by the user's input (config, data, checkpoint); shown without a traceback."""


class ConfigError(GlsdError):
    """A preset, override or config value is invalid."""


class DataError(GlsdError):
    """A dataset URI or its files are missing, incomplete or unreadable."""


class CheckpointError(GlsdError):
    """A checkpoint is missing, corrupt, of another architecture, or not a glsd file."""
