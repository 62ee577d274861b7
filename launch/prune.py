#!/usr/bin/env python
"""`seft-prune` as a script (for launchers that take a file: deepspeed, torchrun, srun).
Usage and options: `python launch/prune.py --help`; the code is seft_scale/cli/prune.py."""
import sys

from seft_scale.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
