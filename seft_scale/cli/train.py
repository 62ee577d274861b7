"""Repair a pruned causal LM with SEFT.

    seft-train --config configs/runs/tiny.yaml --output-dir out/tiny [key=value ...]
    deepspeed --num_gpus N launch/train.py --ds_config configs/ds/zero3.json --config ... --output-dir ...
    torchrun --nproc_per_node N launch/train.py --backend fsdp --config ... --output-dir ...

(`python launch/train.py` and `python -m seft_scale.cli.train` are the same command.)

Writes <output-dir>/{config.yaml, pruned/ (when the run prunes or builds the model), metrics.jsonl,
checkpoints/, export/ (plain HF folder), report.json}.
"""
import argparse
import sys
from pathlib import Path

from seft_scale.backends import make_backend
from seft_scale.cli import report_errors
from seft_scale.config import load_config
from seft_scale.errors import ConfigError
from seft_scale.train import train


def main(argv=None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run(args))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (see configs/runs/)")
    ap.add_argument("--output-dir", required=True, help="folder for everything the run writes")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --output-dir from its latest checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines")
    ap.add_argument("--start-model", default=None, metavar="DIR",
                    help="the already pruned model to start from; the run's prune settings still "
                         "name the pruner LoRA* re-prunes with")
    ap.add_argument("--backend", choices=["local", "zero3", "fsdp"], default=None,
                    help="where the model lives: one process (local), DeepSpeed ZeRO-3 (zero3), "
                         "PyTorch FSDP2 (fsdp). Default: zero3 with --ds_config, else local")
    ap.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                    help="DeepSpeed JSON config (ZeRO stage 3), e.g. configs/ds/zero3.json")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None,
                    help=argparse.SUPPRESS)  # added by the deepspeed launcher; LOCAL_RANK is used
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. train.steps=100 seft.lora_rank=16")
    return ap.parse_intermixed_args(argv)  # options may follow key=value overrides


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    backend_name = args.backend or ("zero3" if args.ds_config else "local")
    if args.ds_config and backend_name != "zero3":
        raise ConfigError(f"--ds_config is for the zero3 backend, not --backend {backend_name}")
    if args.start_model and not Path(args.start_model, "config.json").is_file():
        raise ConfigError(f"--start-model: {args.start_model} is not a Hugging Face model folder "
                          "(no config.json)")
    backend = make_backend(backend_name, cfg=cfg, ds_config=args.ds_config)
    train(cfg, args.output_dir, resume=args.resume, backend=backend, progress=not args.no_progress,
          start_model=args.start_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
