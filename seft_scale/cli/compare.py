"""Compare repair methods on the same pruned model, data, token count and trainable budget.

    seft-compare --config configs/runs/tiny.yaml --output-dir out/compare \\
        [--methods none,static,lora_star,sqft,seft] [--lr seft=2e-3,lora_star=5e-4,...] [key=value ...]

The start model is pruned once (DIR/pruned, by the config's prune section); each method then runs
as its own `python -m seft_scale.cli.train --start-model DIR/pruned` process into DIR/<method>, on one process
(--backend local). LoRA-based methods use baseline.lora_rank (default seft.lora_rank), so their
r·(d_in+d_out) trainable values per matrix equal SEFT's K; static trains every nonzero.

Learning rates (--lr method=value,...), defaults: static 5e-5, lora_star 5e-4, sqft 5e-4, seft the
config's train.lr (after key=value overrides).

Prints one table (held-out perplexity, exact sparsity, wall time, peak RSS per method) and writes
DIR/compare.json, DIR/compare.png and DIR/logs/<method>.{out,err}. A method that fails is shown
with the last line of its stderr; the others still run; the exit status is 1 if any failed.
"""
import argparse
import sys

from seft_scale.cli import report_errors
from seft_scale.compare import DEFAULT_METHODS, compare, parse_lrs, parse_methods


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (see configs/runs/)")
    ap.add_argument("--output-dir", required=True, help="new (or empty) folder for every run's output")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, run in this order (default {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--lr", default=None, metavar="METHOD=LR,...",
                    help="peak learning rate per method, e.g. seft=2e-3,static=5e-5")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for every run, e.g. train.steps=20 seft.lora_rank=8")
    args = ap.parse_args(argv)

    def work() -> int:
        result = compare(args.config, args.output_dir, parse_methods(args.methods), parse_lrs(args.lr),
                         args.overrides)
        return int(any(r["status"] != "ok" for r in result["rows"]))
    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
