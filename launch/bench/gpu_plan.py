#!/usr/bin/env python
"""The planner's per-GPU memory (seft_scale/plan.py plan_memory) against the memory a SEFT run
really takes, at world size 1, on the local, fsdp or zero3 backend (figures, not tests).

    python launch/bench/gpu_plan.py build --shape l7 --layers 2 --out /tmp/l7     # once
    python launch/bench/gpu_plan.py measure --model /tmp/l7 --backend local --batch 2 --seq 2048 --json l.json
    python launch/bench/gpu_plan.py measure --model /tmp/l7 --backend fsdp ...    # one rank, in-process group
    torchrun --nproc_per_node 1 launch/bench/gpu_plan.py measure --backend fsdp ...   # the same, launched

`build` saves a random Llama of launch/bench/bench_step.py's shapes (l7: Llama-2-7B's layers),
magnitude-pruned 50%, with a small BPE tokenizer, as an HF folder. `measure` loads it through the
backend exactly as a run does (backend.load_model, wrap, SeftMethod), runs steps 1-2 as warm-up
(an update every 2 steps after a 1-step window), then measures three phases: a plain training
step (3), a selection-window step (4: forward and backward with the window open) and the
topology update that ends it. The plan is asked about the same run: the folder's config.json,
the same SeftConfig, backend, world size, θ and compute dtypes, micro-batch and sequence length
(and under zero3 the zero_optimization block the backend was given).

Measured peak of a phase:
* CUDA: torch.cuda.max_memory_allocated over the phase (reset at its start): everything the
  caching allocator hands out, cuBLAS workspaces included (the plan leaves those to its
  HEADROOM_GIB); resident = torch.cuda.memory_allocated before the phases;
* CPU: the bytes of the tensors alive at the phase's start (θ storages, SEFT slots with their
  δ-gradients and Adam moments, open window scores) plus the heap's peak above them while the
  phase runs (glibc mallinfo2 sampled after every aten op: bench_step.peak_bytes), the method of
  tests/distributed/test_plan_measured.py.
One JSON per run; launch/bench/gpu_report.py tabulates them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
from pathlib import Path

import torch

from seft_scale.config import DTYPES, ModelConfig, RunConfig, SeftConfig, TrainConfig, resolve_dtype
from seft_scale.model import find_targets, save_model, train_tokenizer
from seft_scale.plan import GIB, ModelShape, PlanInput, plan_memory
from seft_scale.seft.method import SeftMethod

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (the shapes, the model builder and peak_bytes of the step benchmark)

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("step", "window", "update")


def build(args) -> None:
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = bench_step.build(argparse.Namespace(model=None, shape=args.shape, layers=args.layers,
                                                seq=args.max_seq, sparsity=0.5), device, dtype)
    vocab = model.config.vocab_size
    tok = train_tokenizer((ROOT / "configs" / "data" / "tempest.txt").read_text(), vocab)
    assert len(tok) <= vocab, (len(tok), vocab)
    save_model(model, tok, Path(args.out))
    print(f"gpu_plan build: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
          f"({args.shape}, {args.layers} layers, {str(dtype).removeprefix('torch.')}) -> {args.out}")


def single_rank_env() -> None:
    """A group of one in this process unless a launcher (torchrun) set one up."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")


def make_backend_for(args, cfg: RunConfig):
    if args.backend == "local":
        from seft_scale.backends.local import LocalBackend
        return LocalBackend(torch.device(args.device))
    single_rank_env()
    from seft_scale.backends import make_backend
    return make_backend(args.backend, cfg=cfg)


def compute_dtype(args, cfg: RunConfig, theta: torch.dtype, device: torch.device) -> torch.dtype:
    """The working weights' dtype: FSDP's param_dtype (backends/fsdp.py: auto = bf16 on CUDA,
    θ's dtype on CPU), θ's own elsewhere."""
    p = cfg.fsdp.param_dtype
    if args.backend != "fsdp" or (p == "auto" and device.type != "cuda"):
        return theta
    return DTYPES["bfloat16" if p == "auto" else p]


def tensor_bytes(model, method: SeftMethod) -> int:
    """The tensors this rank holds between phases: θ's storages (shards, padding included) and
    every SparseDelta tensor on the device (slots, δ-gradients, Adam moments, ages, exceptions,
    open window scores); the host bitmap of θ edits is not device memory."""
    def nbytes(t):
        return t.untyped_storage().nbytes() if t is not None else 0
    total = sum(nbytes(p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p))
                for p in model.parameters())
    for d in method.deltas:
        total += sum(nbytes(t) for t in (d.pos, d.values, d.values.grad, d.exp_avg, d.exp_avg_sq, d.age,
                                         d.zeros))
        if d.window is not None:
            total += sum(nbytes(t) for t in vars(d.window).values() if isinstance(t, torch.Tensor))
    return total


def measure(args) -> dict:
    seft = SeftConfig(lora_rank=args.rank, update_interval=2, window=1, window_scores=args.window_scores)
    cfg = RunConfig(model=ModelConfig(path=args.model, dtype=args.dtype), seft=seft,
                    train=TrainConfig(steps=1000, micro_batch_size=args.batch))
    cfg.data.seq_len = args.seq
    backend = make_backend_for(args, cfg)
    device = backend.device
    model, _ = backend.load_model(cfg.model, path=args.model)
    model = backend.wrap(model)
    method = SeftMethod(cfg, backend, model, find_targets(model, cfg.seft.targets))
    theta = method.deltas[0].base.dtype  # as loaded (FSDP loads on the CPU: auto is fp32 there)
    compute = compute_dtype(args, cfg, theta, device)
    model.train()
    method.init_state()
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "labels": ids}

    def forward_backward(step: int):
        method.before_step(step)
        model(**batch).loss.backward()

    for t in (1, 2):  # warm-up: one-time allocations (workspaces, buffers) happen here
        forward_backward(t)
        method.after_backward(t, 1e-3)

    def in_use() -> int:
        if device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return tensor_bytes(model, method)

    measured = {"resident": in_use()}
    for phase, fn in (("step", lambda: (forward_backward(3), method.after_backward(3, 1e-3))),
                      ("window", lambda: forward_backward(4)),  # opens the window scores
                      ("update", lambda: method.after_backward(4, 1e-3))):
        start = in_use()
        measured[phase] = start + bench_step.peak_bytes(fn, device)

    shape = ModelShape.from_hf(json.loads((Path(args.model) / "config.json").read_text()), args.model)
    plan = plan_memory(PlanInput(
        shape=shape, seft=cfg.seft, world=backend.world, backend=args.backend,
        dtype=str(theta).removeprefix("torch."), compute_dtype=str(compute).removeprefix("torch."),
        micro_batch=args.batch, seq_len=args.seq, reshard_after_forward=cfg.fsdp.reshard_after_forward,
        zero=backend.ds_config["zero_optimization"] if args.backend == "zero3" else {}))
    planned = {"resident": plan.resident, "step": plan.step_peak, "window": plan.window_peak,
               "update": plan.update_peak}
    out = {"backend": args.backend, "world": backend.world, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "comm": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
           "dtype": str(theta).removeprefix("torch."), "compute_dtype": str(compute).removeprefix("torch."),
           # what seft-plan assumes for this config (cli/plan.py: "auto" dtypes are bf16, CUDA)
           "seft_plan_dtype": "bfloat16" if args.dtype == "auto" else args.dtype,
           "model": shape.__dict__, "batch": args.batch, "seq": args.seq, "lora_rank": args.rank,
           "window_scores": args.window_scores, "slots": plan.slots,
           "measured_by": ("torch.cuda.max_memory_allocated per phase" if device.type == "cuda" else
                           "tensor bytes at the phase start + heap peak above them (mallinfo2)"),
           "measured": measured, "planned": planned,
           "ratio": {k: measured[k] / planned[k] for k in planned},
           "torch": torch.__version__, "python": platform.python_version()}
    print(f"gpu_plan {args.backend} W={backend.world} {device} {out['dtype']}/{out['compute_dtype']} "
          f"batch {args.batch}x{args.seq}: " + ", ".join(
              f"{k} {measured[k] / GIB:.3f}/{planned[k] / GIB:.3f} GiB ({out['ratio'][k]:.2f})"
              for k in planned)
          + " (measured/planned)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    b = sub.add_parser("build", help="save the pruned random model the measurements load")
    b.add_argument("--shape", choices=sorted(bench_step.SHAPES), default="l7")
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--max-seq", type=int, default=4096, help="max_position_embeddings")
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    b.add_argument("--device", default=default_device, help="where the model is pruned")
    b.add_argument("--out", required=True)
    m = sub.add_parser("measure", help="one run: measured memory against the plan")
    m.add_argument("--model", required=True, help="a folder written by `build`")
    m.add_argument("--backend", choices=["local", "fsdp", "zero3"], default="local")
    m.add_argument("--batch", type=int, default=1, help="micro-batch (train.micro_batch_size)")
    m.add_argument("--seq", type=int, default=2048, help="tokens per sequence (data.seq_len)")
    m.add_argument("--rank", type=int, default=32, help="seft.lora_rank: K = rank·(d_in + d_out)")
    m.add_argument("--window-scores", choices=["candidates", "dense"], default="candidates")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model.dtype")
    m.add_argument("--device", default=default_device, help="local backend only; sharded: CUDA if present")
    m.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        build(args)
    else:
        if not (Path(args.model) / "config.json").is_file():
            ap.error(f"--model: {args.model} is not a model folder (no config.json); run `build` first")
        measure(args)


if __name__ == "__main__":
    main()
