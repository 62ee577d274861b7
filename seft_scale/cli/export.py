"""Export a run (finished or not) from a checkpoint as a plain Hugging Face folder.

    seft-export --run out/my_run [--checkpoint out/my_run/checkpoints/step_00000400]
                [--out out/my_run/export_step400]

Reads the run's config.yaml, its starting sparse model (<run>/pruned, or the model.path it was
given) and the checkpoint's per-rank SEFT state — written by any backend at any world size — on
one process, merges W = θ + S and writes the HF folder plus report.json (per-matrix budget, nnz,
reactivated positions). This is also the way to get the repaired weights out of a ZeRO-3 or FSDP2
checkpoint folder: DeepSpeed's zero_to_fp32.py only sees engine parameters, not the sparse delta.
"""
import argparse
import sys
from pathlib import Path

from seft_scale.cli import report_errors
from seft_scale.export import export_checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run's --output-dir")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the latest)")
    ap.add_argument("--out", default=None, help="where to write (default: <run>/export); must not exist")
    args = ap.parse_args(argv)
    return report_errors(lambda: export_checkpoint(
        Path(args.run), Path(args.checkpoint) if args.checkpoint else None,
        Path(args.out) if args.out else None))


if __name__ == "__main__":
    sys.exit(main())
