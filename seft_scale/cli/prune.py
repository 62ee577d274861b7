"""One-shot pruning of an HF model folder, one decoder layer in memory at a time.

    seft-prune --model DIR --method {magnitude,wanda,sparsegpt} --sparsity 0.5 \\
        [--pattern unstructured|N:M] [--granularity row|matrix] --calib-data TEXT.txt \\
        [--nsamples 128 --seqlen 2048 --seed 0] --out DIR
    seft-prune --config configs/runs/<run>.yaml --out DIR   # model.path, prune.*

Flags override the config's prune section (--calib-data is prune.calib_data, and so on).
Writes DIR: sharded safetensors with exact zeros, config and tokenizer files copied, and
prune_report.json (per-matrix sparsity, summary, measured vs predicted peak memory).
"""
import argparse
import dataclasses
import sys

import torch

from seft_scale.cli import report_errors
from seft_scale.config import PruneConfig, SeftConfig, load_config, parse_pattern
from seft_scale.errors import ConfigError
from seft_scale.prune import prune_folder

MiB = 1 << 20


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config YAML: model.path, prune.* and seft.targets are read")
    ap.add_argument("--model", help="HF model folder (config.json + safetensors + tokenizer)")
    ap.add_argument("--out", required=True, help="new (or empty) folder for the pruned model")
    ap.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--sparsity", type=float, help="fraction zeroed per group (default 0.5)")
    ap.add_argument("--pattern", help="unstructured (default) or N:M, e.g. 2:4")
    ap.add_argument("--granularity", choices=["row", "matrix"],
                    help="unstructured comparison group (default row, as Wanda)")
    ap.add_argument("--calib-data", dest="calib_data", help="calibration data for wanda/sparsegpt: a .txt / .json(l) / .parquet / "
                         ".csv file with a text column, a folder of .txt, or a dataset name")
    ap.add_argument("--nsamples", type=int, help="calibration windows (default 128)")
    ap.add_argument("--seqlen", type=int, help="tokens per window (default 2048)")
    ap.add_argument("--seed", type=int, help="seed of the window offsets (default 0)")
    ap.add_argument("--block-size", dest="block_size", type=int, help="SparseGPT column block (128)")
    ap.add_argument("--damp", type=float, help="SparseGPT dampening, fraction of mean diag H (0.01)")
    ap.add_argument("--targets", nargs="+", help="Linear names to prune (default: q,k,v,o,gate,up,down)")
    ap.add_argument("--device", default="cpu", help="where layers are calibrated (cpu, cuda, ...)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                    help="compute dtype (the output keeps the checkpoint's dtype)")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="allow model code shipped in the folder to run (off unless you trust it)")
    return ap.parse_args(argv)


def resolve(args) -> tuple[str, PruneConfig, list[str], str]:
    """(model folder, validated PruneConfig, target names, where the names came from) from
    --config and the flags."""
    prune, targets, model = PruneConfig(), list(SeftConfig().targets), args.model
    targets_key = "--targets"
    if args.config:
        run = load_config(args.config)
        prune, targets, model = run.prune, run.seft.targets, args.model or run.model.path
        targets_key = "seft.targets (--config)"
    for f in dataclasses.fields(PruneConfig):
        if getattr(args, f.name, None) is not None:
            setattr(prune, f.name, getattr(args, f.name))
    if args.targets:
        targets, targets_key = args.targets, "--targets"
    if not model:
        raise ConfigError("--model: required (or model.path in --config)")
    if prune.method == "none":
        raise ConfigError("--method: required (magnitude, wanda or sparsegpt)")
    try:
        nm = parse_pattern(prune.pattern)
    except ValueError as e:
        raise ConfigError(f"--pattern: {e}") from None
    if nm is not None:
        if args.sparsity is not None and abs(args.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ConfigError(f"--sparsity {args.sparsity} contradicts --pattern {prune.pattern} "
                              f"(which means sparsity {1 - nm[0] / nm[1]}); drop one of them")
        prune.sparsity = 1 - nm[0] / nm[1]
    return model, prune.validate(), targets, targets_key


def main(argv=None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run(args))


def run(args) -> int:
    model_dir, prune, targets, targets_key = resolve(args)
    report = prune_folder(model_dir, args.out, prune, targets, args.device, getattr(torch, args.dtype),
                          trust_remote_code=args.trust_remote_code, targets_key=targets_key)
    s, mem = report["summary"], report["memory"]
    print(f"pruned {s['matrices']} matrices with {report['method']} ({report['pattern']}"
          f"{', ' + report['granularity'] if report['pattern'] == 'unstructured' else ''}): "
          f"sparsity {s['sparsity']:.4f}, {s['nnz']}/{s['numel']} nonzeros"
          f"{', N:M valid' if s.get('nm_valid') else ''} in {report['time_s']:.1f} s")
    terms = " + ".join(f"{k} {v / MiB:.1f}" for k, v in mem["terms"].items())
    print(f"peak RSS: measured {mem['measured_peak_rss'] / MiB:.1f} MiB, predicted "
          f"{mem['predicted_peak_rss'] / MiB:.1f} MiB (R0 + max(F, E + N·T·h·b, "
          f"layer + 2·N·T·h·b + S + X); terms in MiB: {terms})")
    print(f"wrote {args.out} (prune_report.json has the per-matrix sparsity)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
