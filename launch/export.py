#!/usr/bin/env python
"""`seft-export` as a script (for launchers that take a file: deepspeed, torchrun, srun).
Usage and options: `python launch/export.py --help`; the code is seft_scale/cli/export.py."""
import sys

from seft_scale.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
