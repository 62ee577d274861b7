"""The errors users meet. The bottom floor of the package: it imports nothing of seft_scale."""


class ConfigError(ValueError):
    """Input that cannot run (a config key, a path, a model, a dataset); the message names it.
    Raised before heavy work starts; the commands print it as one line and exit 2."""


class RunStopped(RuntimeError):
    """A run that cannot go on (its loss or gradient stopped being finite): the message says at
    which step, what was kept on disk and what to change. The commands print it as one line and
    exit 1."""
