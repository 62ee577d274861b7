#!/usr/bin/env python
"""`seft-eval` as a script (for launchers that take a file: deepspeed, torchrun, srun).
Usage and options: `python launch/evaluate.py --help`; the code is seft_scale/cli/evaluate.py."""
import sys

from seft_scale.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
