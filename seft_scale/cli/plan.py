"""Per-GPU memory of a SEFT run, before it runs, and whether it fits a GPU.

    seft-plan --config configs/models/llama-2-70b.yaml --world-size 64 --nodes 8 \\
        --gpu h100-80gb --seq 1024
    seft-plan --config configs/runs/tiny.yaml --world-size 2 --backend zero3
    seft-plan --config configs/runs/llama-2-7b-commonsense.yaml \\
        --preset configs/models/llama-2-7b.yaml --world-size 8 --gpu a100-40gb

--config is a run config (its model.path's config.json gives the shape, or --preset when that
folder is not on this machine; a run without model.path plans its model.tiny) or a model preset
(configs/models/). Run-config values (micro-batch, sequence length, dtype, SEFT budget, fsdp
section) are used unless overridden here. The formula and what it covers:
seft_scale/plan.py. Exit status 1 when --gpu/--gpu-mem is given and the run does not fit.
"""
import argparse
import dataclasses
import sys

from seft_scale.backends.ds_config import read_ds_json
from seft_scale.cli import report_errors
from seft_scale.config import load_config
from seft_scale.errors import ConfigError
from seft_scale.plan import (GPUS, PlanInput, format_plan, load_preset, plan_memory,
                             read_shape, read_yaml, smallest_world, usable_bytes,
                             write_ds_config)

DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def build_input(args) -> tuple[PlanInput, dict]:
    """The formula's input from the files and flags (planning for CUDA: "auto" dtypes are bf16);
    also returns the preset's zero_optimization block."""
    preset = load_preset(args.preset) if args.preset else None
    if "shape" in read_yaml(args.config):  # --config is a preset
        if preset is not None or args.overrides:
            raise ConfigError("--config is a preset: it takes neither --preset nor key=value "
                              "overrides (use --micro-batch, --seq, --dtype)")
        preset = load_preset(args.config)
        shape, seft, fsdp = preset.shape, preset.seft, preset.fsdp
        dtype, micro, seq = "bfloat16", 1, min(2048, shape.max_position_embeddings)
        checkpointing, nm = False, False
    else:
        cfg = load_config(args.config, args.overrides, check_paths=False)
        shape, seft, fsdp = read_shape(args.config, preset), cfg.seft, cfg.fsdp
        dtype = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
        micro, seq = cfg.train.micro_batch_size, cfg.data.seq_len
        checkpointing, nm = cfg.train.activation_checkpointing, cfg.prune.nm is not None
    dtype = DTYPE_NAMES.get(args.dtype, args.dtype) or dtype
    compute = dtype
    if args.backend == "fsdp" and not args.dtype:  # FSDP computes in param_dtype
        compute = "bfloat16" if fsdp.param_dtype == "auto" else fsdp.param_dtype
    nodes = args.nodes or 1
    if args.world_size % nodes:
        raise ConfigError(f"--world-size {args.world_size} is not a multiple of --nodes {nodes}")
    zero = {}
    if args.backend == "zero3":
        zero = read_ds_json(args.ds_config, "--ds-config").get("zero_optimization", {})
        if preset is not None and not args.ds_config:
            zero = {**zero, **preset.zero_optimization}
    inp = PlanInput(shape=shape, seft=seft, world=args.world_size, backend=args.backend,
                    dtype=dtype, compute_dtype=compute, micro_batch=args.micro_batch or micro,
                    seq_len=args.seq or seq,
                    reshard_after_forward=fsdp.reshard_after_forward, zero=zero,
                    activation_checkpointing=checkpointing or args.activation_checkpointing,
                    gpus_per_node=args.world_size // nodes, nm=nm)
    return inp, (preset.zero_optimization if preset else {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML or model preset YAML")
    ap.add_argument("--preset", help="model preset giving the shape of a run whose model.path is elsewhere")
    ap.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) in all")
    ap.add_argument("--nodes", type=int, help="nodes (ranks per node = world size / nodes)")
    ap.add_argument("--backend", choices=["local", "zero3", "fsdp"],
                    help="default: local at world size 1, else fsdp")
    ap.add_argument("--ds-config", help="DeepSpeed JSON for zero3 (default: the package's, as configs/ds/zero3.json, "
                                        "with the preset's zero_optimization merged in)")
    gpu = ap.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", choices=sorted(GPUS), help="GPU to check the fit against")
    gpu.add_argument("--gpu-mem", type=float, metavar="GiB", help="GPU memory to check against")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "fp16", "bfloat16", "float32", "float16"],
                    help="weights/compute dtype (default: the run's model.dtype; auto = bf16)")
    ap.add_argument("--micro-batch", type=int, help="sequences per rank per forward")
    ap.add_argument("--seq", type=int, help="tokens per sequence")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="plan with train.activation_checkpointing on")
    ap.add_argument("--write-ds-config", metavar="OUT.json",
                    help="write --ds-config (default: the package's zero3 config) with the preset's "
                         "zero_optimization merged in, for seft-train --ds_config")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides")
    args = ap.parse_intermixed_args(argv)  # options may follow key=value overrides
    args.backend = args.backend or ("local" if args.world_size == 1 else "fsdp")
    return report_errors(lambda: run(args))


def run(args) -> int:
    for key in ("world_size", "nodes", "micro_batch", "seq"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1")
    if args.gpu_mem is not None and args.gpu_mem <= 0:
        raise ConfigError("--gpu-mem must be > 0 GiB")
    inp, preset_zero = build_input(args)
    plan = plan_memory(inp)
    if args.write_ds_config:
        if not preset_zero:
            raise ConfigError("--write-ds-config needs a preset (--config or --preset) with "
                              "zero_optimization")
        write_ds_config(args.ds_config, preset_zero, args.write_ds_config)
        print(f"wrote {args.write_ds_config}")
    gpu_gib = GPUS.get(args.gpu) if args.gpu else args.gpu_mem
    print(format_plan(plan, args.gpu, gpu_gib))
    if gpu_gib is None:
        return 0
    fits = plan.peak <= usable_bytes(gpu_gib)
    if not fits and inp.backend != "local":
        per_node = inp.gpus_per_node
        w = smallest_world(inp, gpu_gib, per_node)
        print(f"smallest world size that fits ({per_node} per node): "
              + (f"{w} ({w // per_node} nodes)" if w else "none up to 4096 ranks: lower the "
                 "micro-batch or sequence length (activations are not sharded)"))
        if inp.backend == "zero3" and not inp.zero.get("offload_param"):
            off = plan_memory(dataclasses.replace(
                inp, zero={**inp.zero, "offload_param": {"device": "cpu"}}))
            verdict = "fits" if off.peak <= usable_bytes(gpu_gib) else "does not fit"
            print(f"with ZeRO param offload (configs/ds/zero3_offload.json): peak "
                  f"{off.peak / 2**30:.1f} GiB per GPU, {off.cpu_bytes_per_rank * per_node / 2**30:.0f} "
                  f"GiB host memory per node: {verdict}")
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
