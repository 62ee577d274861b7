#!/usr/bin/env python
"""Step time and peak memory of SEFT vs a PEFT LoRA of the same trainable count vs static-mask
fine-tuning, on the same pruned model and batch, measured in one run (figures, not tests).

    python launch/bench/bench_step.py --shape l7 --layers 1 --batch 1 --seq 512 --rank 32
    python launch/bench/bench_step.py --shape smollm --layers 4            # SmolLM2-135M's shape
    python launch/bench/bench_step.py --model DIR --layers 0 --seq 512      # an HF folder
    python launch/bench/bench_step.py --shape l7 --layers 2 --seq 2048 --json OUT.json  # + figures as JSON

--shape l7 is Llama-2-7B's decoder layer (hidden 4096, intermediate 11008, 32 heads) with a
small vocabulary (2048), so the layers, not the embedding and logits, dominate the step, as they
do at 7B-70B; a random model built here (nothing is downloaded), pruned 50% by magnitude.

Printed per method: the median step time (forward + backward + optimizer) and its ratio to LoRA,
and the peak memory of a step above the model (CUDA: torch.cuda.max_memory_allocated; CPU: the
heap's bytes in use, glibc mallinfo2, sampled after every aten op). For SEFT: plain steps per
kernel (sddmm, dense), the window's first step (dense G: the candidates are chosen), its later
steps (G sampled at the candidates), one topology update, and the amortised step over ΔT = 10,
A = 5 as a run has them: (ΔT - A)·plain + first + (A - 1)·later + update, all / ΔT. The torch
profiler's matmul count of a plain step shows that no full weight-gradient matmul runs there.
Also the gather_cost_ratio of seft.kernel: auto (sampled multiply-add vs matmul multiply-add).
--shape tiny (hidden 256) is for checking the script itself in seconds (launch/gpu_check.sh's CPU
mode). On CUDA every clock read waits for the device first (torch.cuda.synchronize).

Measured on 2 AVX2 cores (2026-12-02): README's benchmark section has the table.
"""
import argparse
import copy
import ctypes
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from seft_scale.backends.local import LocalBackend
from seft_scale.config import ModelConfig, RunConfig, SeftConfig, TinyModelConfig, TrainConfig
from seft_scale.model import build_tiny_llama, find_targets, load_model
from seft_scale.prune.masks import keep_mask
from seft_scale.seft.kernels import sddmm
from seft_scale.seft.method import SeftMethod

TARGETS = SeftConfig().targets
SHAPES = {  # (hidden, intermediate, heads, kv heads, vocab)
    "l7": (4096, 11008, 32, 32, 2048),
    "smollm": (576, 1536, 9, 3, 49152),
    "tiny": (256, 688, 8, 4, 1024),
}


def now() -> float:
    """The host clock once queued device work is done (CUDA runs asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        times.append(now() - t0)
    return statistics.median(times)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory while fn() runs, above what was in use when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.utils._python_dispatch import TorchDispatchMode
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def in_use():
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd
    start = in_use()

    class Peak(TorchDispatchMode):
        peak = start

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Peak.peak = max(Peak.peak, in_use())
            return out
    with Peak():
        fn()
    return Peak.peak - start


def build(args, device, dtype):
    if args.model:
        model, _ = load_model(ModelConfig(path=args.model, dtype=str(dtype).removeprefix("torch.")), device)
        if args.layers:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
    else:
        h, i, heads, kv, vocab = SHAPES[args.shape]
        shape = TinyModelConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=args.layers,
                                num_attention_heads=heads, num_key_value_heads=kv,
                                max_position_embeddings=max(2048, args.seq))
        model = build_tiny_llama(ModelConfig(tiny=shape), vocab, dtype, "sdpa").to(device)
    model.config.use_cache = False
    with torch.no_grad():
        for _, lin in find_targets(model, TARGETS):
            lin.weight.mul_(keep_mask(lin.weight.abs(), args.sparsity).to(lin.weight.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def bench_seft(model, batch, args, device, kernel: str, screen_stride: int = 1, window: bool = True):
    """SEFT through the method the trainer drives: update every 10 steps after a 5-step window
    whose candidates are chosen from the G of every `screen_stride`-th token."""
    cfg = RunConfig(seft=SeftConfig(lora_rank=args.rank, kernel=kernel, window_screen_stride=screen_stride),
                    train=TrainConfig(steps=10_000, lr=1e-3, max_grad_norm=1.0))
    method = SeftMethod(cfg, LocalBackend(device), model, find_targets(model, TARGETS))
    method.init_state()

    def at(t: int):
        """Step t of the schedule: 1-5 plain, 6-9 window, 10 window + topology update."""
        method.before_step(t)
        model(**batch).loss.backward()
        method.after_backward(t, 1e-3)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_plain = timed(lambda: at(1), args.repeats)
    out = {"plain": t_plain}
    if window:
        def window_sequence():
            times = []
            for t in range(6, 11):
                t0 = now()
                method.before_step(t)
                model(**batch).loss.backward()
                if t < 10:
                    method.after_backward(t, 1e-3)
                times.append(now() - t0)
            t0 = now()
            method.after_backward(10, 1e-3)  # window end + the topology update
            times.append(now() - t0)
            return times
        window_sequence()  # warm-up
        runs = [window_sequence() for _ in range(args.repeats)]  # each phase: median over --repeats windows
        med = [statistics.median(r[i] for r in runs) for i in range(6)]
        out.update(first=med[0], later=statistics.median(med[1:4]), update=med[5])
        out["window_last"] = med[4]  # the update step's forward/backward (a later window step)
        out["amortised"] = (5 * t_plain + med[0] + 3 * out["later"] + med[4] + med[5]) / 10
        out["peak_plain"] = peak_bytes(lambda: at(1), device)
        out["peak_window"] = peak_bytes(lambda: at(6), device)
        for t in range(7, 11):  # finish that window so the state is consistent
            at(t)
        with torch.profiler.profile(record_shapes=True) as prof:
            at(1)
        out["weight_grad_matmuls"] = count_weight_grad_matmuls(prof, model, batch)
        k = sum(len(d.pos) for d in method.deltas)
        out.update(trainable=k, state_bytes=k * 28, kernels=sorted({m.seft_kernel for m in method.modules.values()}))
    return out


def count_weight_grad_matmuls(prof, model, batch) -> int:
    """Matmuls of a step whose output is a whole target weight [d_out, d_in] (G = gᵀx)."""
    shapes = {tuple(lin.weight.shape) for _, lin in find_targets(model, TARGETS)}
    tokens = batch["input_ids"].numel()
    n = 0
    for e in prof.events():
        if e.name in ("aten::mm", "aten::addmm", "aten::matmul"):
            dims = [tuple(s) for s in e.input_shapes if len(s) == 2]
            if len(dims) >= 2 and (dims[0][0], dims[1][1]) in shapes and dims[0][1] == tokens:
                n += 1
    return n


def bench_lora(model, batch, args, device):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                  target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep grads allocated, as in a real loop's steady state
        if device.type == "cuda":
            torch.cuda.synchronize()
    t = timed(step, args.repeats)
    n = sum(p.numel() for p in params)
    return {"plain": t, "amortised": t, "trainable": n, "peak_plain": peak_bytes(step, device),
            "state_bytes": n * 16}


def bench_static(model, batch, args, device):
    targets = find_targets(model, TARGETS)
    masks = [lin.weight != 0 for _, lin in targets]
    params = [lin.weight for _, lin in targets]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step():
        model(**batch).loss.backward()
        for p, m in zip(params, masks):
            p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masks):
                p.mul_(m)
        opt.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    t = timed(step, args.repeats)
    n = sum(int(m.sum()) for m in masks)
    return {"plain": t, "amortised": t, "trainable": n, "peak_plain": peak_bytes(step, device),
            "state_bytes": sum(p.numel() for p in params) * 12 + sum(m.numel() for m in masks)}


def gather_cost_ratio(model, tokens: int, repeats: int, rank: int, device) -> dict:
    """Per target shape: the sampled multiply-add's cost in matmul multiply-adds (the cost rule's
    ratio), from the SDDMM at K = rank·(d_in + d_out) slots and the dense G = gᵀx."""
    out = {}
    for _, lin in find_targets(model, TARGETS):
        d_out, d_in = lin.weight.shape
        if (d_out, d_in) in out:
            continue
        k = min(rank * (d_in + d_out), d_out * d_in)
        x = torch.randn(tokens, d_in, device=device, dtype=lin.weight.dtype)
        g = torch.randn(tokens, d_out, device=device, dtype=lin.weight.dtype)
        pos = torch.randperm(d_out * d_in, device=device)[:k].sort().values
        t_s = timed(lambda: sddmm(g, x, pos, (d_out, d_in)), repeats)
        t_d = timed(lambda: (g.t() @ x).reshape(-1)[pos], repeats)
        out[(d_out, d_in)] = {"sddmm_ms": t_s * 1e3, "dense_ms": t_d * 1e3,
                              "ratio": (t_s / (tokens * k)) / (t_d / (tokens * d_out * d_in))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm", help="random model's shape")
    ap.add_argument("--model", default=None, help="an HF folder instead of --shape")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (0 with --model: all)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank; SEFT gets K = rank·(d_in+d_out)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--kernels", default="sddmm,dense", help="SEFT kernels to time (comma-separated)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--screen-strides", default=str(SeftConfig().window_screen_stride),
                    help="seft.window_screen_stride values whose windows to time (comma-separated; "
                         "the first kernel only)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write every figure printed (seconds, bytes) as JSON to PATH")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    kernels = [k for k in args.kernels.split(",") if k]
    args.main_kernel = kernels[0]
    torch.manual_seed(0)
    base = build(args, device, dtype)
    vocab = base.config.vocab_size
    ids = torch.randint(vocab, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "labels": ids}
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
          f"{base.config.num_hidden_layers} layers (hidden {base.config.hidden_size}, intermediate "
          f"{base.config.intermediate_size}, vocab {vocab}); batch {args.batch}x{args.seq}; rank "
          f"{args.rank}; sparsity {args.sparsity}; {device} {str(dtype).removeprefix('torch.')}; "
          f"threads {torch.get_num_threads()}")
    res = {"lora": bench_lora(copy.deepcopy(base), batch, args, device),
           "static": bench_static(copy.deepcopy(base), batch, args, device)}
    strides = [int(v) for v in args.screen_strides.split(",") if v]
    for kernel in kernels:
        for i, st in enumerate(strides if kernel == args.main_kernel else strides[:1]):
            name = f"seft:{kernel}" + (f":s{st}" if i else "")
            res[name] = bench_seft(copy.deepcopy(base), batch, args, device, kernel, st,
                                   window=kernel == args.main_kernel)
    lora = res["lora"]
    mib = 2 ** 20
    print(f"\n{'method':12} {'step ms':>9} {'x LoRA':>7} {'peak MiB':>9} {'x LoRA':>7} {'trainable':>11}")
    for name, r in res.items():
        peak = r.get("peak_plain")
        print(f"{name:12} {r['plain'] * 1e3:9.1f} {r['plain'] / lora['plain']:7.2f} "
              + (f"{peak / mib:9.1f} {peak / lora['peak_plain']:7.2f}" if peak is not None else f"{'':9} {'':7}")
              + f" {r.get('trainable', 0):11,d}")
    p = lora["plain"]
    for i, st in enumerate(strides):
        s = res[f"seft:{args.main_kernel}" + (f":s{st}" if i else "")]
        print(f"\nSEFT ({args.main_kernel}, window_screen_stride {st}; kernels per matrix by the cost rule: "
              f"{'/'.join(s['kernels'])}): plain step {s['plain'] * 1e3:.1f} ms ({s['plain'] / p:.2f}x LoRA; "
              f"target <= 1.10), window first step {s['first'] * 1e3:.1f} ms ({s['first'] / p:.2f}x), later "
              f"window steps {s['later'] * 1e3:.1f} ms ({s['later'] / p:.2f}x), topology update "
              f"{s['update'] * 1e3:.1f} ms ({s['update'] / s['plain']:.2f} plain steps; target <= 1)")
        print(f"amortised over ΔT=10, A=5: {s['amortised'] * 1e3:.1f} ms = {s['amortised'] / p:.2f}x LoRA "
              f"(target <= 1.15)")
    s = res[f"seft:{args.main_kernel}"]
    print(f"peak memory above the model: plain step {s['peak_plain'] / mib:.1f} MiB "
          f"({s['peak_plain'] / lora['peak_plain']:.2f}x LoRA's {lora['peak_plain'] / mib:.1f}), window "
          f"step {s['peak_window'] / mib:.1f} MiB; trainable state {s['state_bytes'] / mib:.1f} MiB vs "
          f"LoRA {lora['state_bytes'] / mib:.1f} MiB")
    print(f"full weight-gradient matmuls in a plain SEFT step (torch profiler): {s['weight_grad_matmuls']}")
    print(f"\nkernel cost ratio ({args.batch * args.seq} tokens, K = rank·(d_in+d_out)):")
    ratios = gather_cost_ratio(base, args.batch * args.seq, args.repeats, args.rank, device)
    for (d_out, d_in), r in ratios.items():
        print(f"  {d_out}x{d_in}: sddmm {r['sddmm_ms']:8.2f} ms  dense G {r['dense_ms']:8.2f} ms  "
              f"-> gather_cost_ratio ≈ {r['ratio']:.1f}")
    if args.json:
        write_json(args, base, device, dtype, res, ratios)


def write_json(args, model, device, dtype, res: dict, ratios: dict) -> None:
    """The run's settings and every figure above (times in s, memory in bytes) as JSON."""
    c = model.config
    run = {k: v for k, v in vars(args).items() if k != "json"}
    run.update(device=str(device), dtype=str(dtype).removeprefix("torch."), layers=c.num_hidden_layers,
               hidden=c.hidden_size, intermediate=c.intermediate_size, vocab=c.vocab_size,
               params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads(),
               torch=torch.__version__, python=platform.python_version(),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    out = {"run": run, "methods": res,
           "kernel_cost_ratio": {f"{d_out}x{d_in}": r for (d_out, d_in), r in ratios.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
