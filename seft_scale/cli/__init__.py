"""The commands users type: console scripts seft-train, seft-prune, seft-eval, seft-export,
seft-compare, seft-plan (pyproject.toml), the same as launch/<name>.py. Each parses its flags and
runs its work through `report_errors`: a ConfigError prints as one line and exits 2."""
from __future__ import annotations

import sys
from typing import Callable

from seft_scale.errors import ConfigError, RunStopped


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def report_errors(work: Callable[[], object]) -> int:
    """The exit status `work()` returns (0 when it returns something else, e.g. a result). Bad
    input (ConfigError) prints `error: <message>` as one line on stderr and gives 2; a run that
    stopped (RunStopped) gives 1."""
    try:
        status = work()
        return status if isinstance(status, int) and not isinstance(status, bool) else 0
    except ConfigError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
