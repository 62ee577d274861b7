"""The commands users type: console scripts seft-train, seft-prune, seft-eval, seft-export,
seft-compare, seft-plan (pyproject.toml), the same as launch/<name>.py. Each parses its flags,
prints a ConfigError as one line and exits 2."""
