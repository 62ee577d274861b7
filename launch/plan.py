#!/usr/bin/env python
"""`seft-plan` as a script (for launchers that take a file: deepspeed, torchrun, srun).
Usage and options: `python launch/plan.py --help`; the code is seft_scale/cli/plan.py."""
import sys

from seft_scale.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
