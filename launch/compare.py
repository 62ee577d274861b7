#!/usr/bin/env python
"""`seft-compare` as a script (for launchers that take a file: deepspeed, torchrun, srun).
Usage and options: `python launch/compare.py --help`; the code is seft_scale/cli/compare.py."""
import sys

from seft_scale.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
