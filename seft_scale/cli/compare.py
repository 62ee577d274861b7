"""Compare repair methods on the same pruned model, data, token count and trainable budget.

    seft-compare --config configs/runs/demo.yaml --output-dir out/compare \\
        [--methods none,static,lora_star,sqft,spp,seft] [--lr seft=2e-3,...] \\
        [--sweep lr [--grid 'seft=1e-3,2e-3;static=1e-5,5e-5']] [--seeds N] \\
        [--ablations seft.merge_dropped=false,seft.adapt_criterion=magnitude] [key=value ...]

The start model is pruned once (DIR/pruned, by the config's prune section); each run is its own
`python -m seft_scale.cli.train --start-model DIR/pruned` process into DIR/runs/<row>/<trial>, on
one process (--backend local). Budgets: LoRA-based methods use baseline.lora_rank (default
seft.lora_rank), so their r·(d_in+d_out) trainable values per matrix equal SEFT's K; spp is
matched as closely as d_out's divisors allow; static trains every nonzero. The table gives each
method's real trainable count.

Learning rates: each method's paper value (static 5e-5, lora_star 1e-4, sqft 3e-4, spp 4e-3; seft
the config's train.lr), or --lr method=value. --sweep lr runs each trained method over a grid
(default: its learning rate x 10^-0.5, 1, 10^0.5; --grid sets one per method) and keeps the one
with the lowest validation loss (data.val_fraction / data.validation, train.eval_batches > 0):
the held-out texts of eval.ppl_data never take part in the choice. A best at the grid's edge is
followed outward one grid step at a time (at most 3 more runs per method) until a worse or failed
point brackets it. --seeds N repeats each chosen
setting with N seeds (mean ± sd). --ablations: one SEFT row per comma-separated item, switches of
one row joined by '+', each at SEFT's chosen learning rate.

Prints one table (perplexity of each eval.ppl_data text, validation loss, lm-eval accuracy of
eval.tasks, exact sparsity, wall time, peak RSS per row) and writes DIR/compare.json,
DIR/compare.md (the table in Markdown), DIR/compare.png and DIR/logs/. A run that fails is shown
with the last line of its stderr; the others still run; the exit status is 1 if any row failed.
compare.json is rewritten after every row: `seft-compare --render DIR` prints the table and
writes compare.md / compare.png from it, e.g. for the rows of a comparison that was stopped.
"""
import argparse
import signal
import sys

from seft_scale.cli import report_errors
from seft_scale.compare import (DEFAULT_METHODS, SWEEPS, compare, parse_ablations, parse_grids, parse_lrs,
                                parse_methods, render)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config YAML (see configs/runs/)")
    ap.add_argument("--output-dir", help="new (or empty) folder for every run's output")
    ap.add_argument("--render", metavar="DIR", help="only print / draw the table of DIR/compare.json")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, run in this order (default {','.join(DEFAULT_METHODS)})")
    ap.add_argument("--lr", default=None, metavar="METHOD=LR,...",
                    help="learning rate per method (the grid's centre with --sweep lr), e.g. seft=2e-3")
    ap.add_argument("--sweep", default=None, choices=SWEEPS,
                    help="lr: choose each method's learning rate from a grid by the validation loss")
    ap.add_argument("--grid", default=None, metavar="'METHOD=LR,LR;...'",
                    help="--sweep lr grids per method, e.g. 'seft=1e-3,2e-3,4e-3;static=1e-5,5e-5'")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per chosen setting (default 1)")
    ap.add_argument("--ablations", default=None, metavar="SWITCH[+SWITCH],...",
                    help="extra SEFT rows, e.g. seft.merge_dropped=false,seft.adapt_criterion=magnitude")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for every run, e.g. train.steps=20 seft.lora_rank=8")
    args = ap.parse_intermixed_args(argv)  # options may follow key=value overrides
    if args.render is None and not (args.config and args.output_dir):
        ap.error("--config and --output-dir are required (or --render DIR)")

    def terminate(signum, frame):  # let the running trial be ended with us (run_trial kills it)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)

    def work() -> int:
        if args.render is not None:
            result = render(args.render)
        else:
            result = compare(args.config, args.output_dir, parse_methods(args.methods), parse_lrs(args.lr),
                             args.overrides, sweep=args.sweep, grids=parse_grids(args.grid), seeds=args.seeds,
                             ablations=parse_ablations(args.ablations))
        return int(any(r["status"] != "ok" for r in result["rows"]))
    return report_errors(work)


if __name__ == "__main__":
    sys.exit(main())
