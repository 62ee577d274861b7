#!/usr/bin/env python
"""`seft-train` as a script (for launchers that take a file: deepspeed, torchrun, srun).
Usage and options: `python launch/train.py --help`; the code is seft_scale/cli/train.py."""
import sys

from seft_scale.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
