#!/usr/bin/env python
"""Step time and trainable-state bytes: SEFT vs a PEFT LoRA of the same trainable count vs
static-mask full fine-tuning, on the same pruned model and batch, measured in one run.

    python launch/bench/bench_step.py                 # a SmolLM2-135M-shaped random Llama, 4 layers
    python launch/bench/bench_step.py --model DIR --layers 0 --batch 2 --seq 512

Prints, per method, the median step time (forward + backward + optimizer), its ratio to LoRA, and
the bytes of trainable state (values, gradients, optimizer moments; SEFT's slot indices and its
support mask listed apart). For SEFT it times plain steps, selection-window steps (dense G
captured) and one topology update, and amortises them over ΔT as a run does:
    (ΔT-A)·t_plain + A·t_window + t_update) / ΔT.
It also measures the gather/dense kernel cost ratio used by seft.gather_cost_ratio.
Figures only — no pass/fail: these machines are shared and noisy.
"""
import argparse
import copy
import statistics
import time

import torch

from seft_scale.backends import LocalBackend
from seft_scale.config import ModelConfig, RunConfig, SeftConfig, TinyModelConfig
from seft_scale.model import build_tiny_llama, find_targets, load_model
from seft_scale.prune.masks import keep_mask
from seft_scale.seft.kernels import linear_sparse_delta
from seft_scale.seft.method import SeftMethod
from seft_scale.seft.topology import topology_update

TARGETS = SeftConfig().targets


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(args):
    if args.model:
        model, _ = load_model(ModelConfig(path=args.model, dtype="float32"), torch.device("cpu"))
        if args.layers:
            model.model.layers = model.model.layers[: args.layers]
            model.config.num_hidden_layers = args.layers
    else:  # SmolLM2-135M's shape
        shape = TinyModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers or 4,
                                num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
        model = build_tiny_llama(ModelConfig(tiny=shape), 49152, torch.float32, "sdpa")
    model.config.use_cache = False
    with torch.no_grad():
        for _, lin in find_targets(model, TARGETS):
            lin.weight.mul_(keep_mask(lin.weight.abs(), args.sparsity))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench_seft(model, batch, args):
    run = RunConfig(seft=SeftConfig(lora_rank=args.rank, kernel=args.kernel))
    cfg = run.seft
    method = SeftMethod(run, LocalBackend(torch.device("cpu")), model, find_targets(model, TARGETS))
    method.init_state()
    deltas, opt = method.deltas, method.opt

    def step(window: bool):
        method.set_capture(window)
        model(**batch).loss.backward()
        opt.step(deltas)

    t_plain = timed(lambda: step(False), args.repeats)
    t_window = timed(lambda: step(True), args.repeats)
    for d in deltas:  # one window's worth of G is in grad_acc now
        d.values.grad = None

    def update():
        saved = [d.grad_acc.clone() for d in deltas]
        topology_update(deltas, cfg.drop_rate, cfg.window, lambda g: opt.seed(g, cfg.window))
        for d, g in zip(deltas, saved):
            d.grad_acc = g
    t_update = timed(update, max(1, args.repeats // 2))
    method.set_capture(False)
    for d in deltas:
        d.grad_acc = None
    dT, A = cfg.update_interval, cfg.window
    amortised = ((dT - A) * t_plain + A * t_window + t_update) / dT
    k = sum(len(d.pos) for d in deltas)
    trainable = k * (4 + 4 + 8 + 4)  # δ, its gradient, Adam moments, int32 age
    return {"plain": t_plain, "window": t_window, "update": t_update, "amortised": amortised,
            "trainable_params": k, "trainable_bytes": trainable, "index_bytes": k * 8,
            "mask_bytes": sum(d.mask.numel() for d in deltas),
            "kernels": sorted({m.seft_kernel for m in method.modules.values()})}


def bench_lora(model, batch, args):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                  target_modules=TARGETS, lora_dropout=0.0))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def step():
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep grads allocated, as in a real loop's steady state
    t = timed(step, args.repeats)
    n = sum(p.numel() for p in params)
    return {"plain": t, "amortised": t, "trainable_params": n,
            "trainable_bytes": state_bytes(params) * 2 + sum(
                state_bytes([s["exp_avg"], s["exp_avg_sq"]]) for s in opt.state.values())}


def bench_static(model, batch, args):
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
    t = timed(step, args.repeats)
    n = sum(int(m.sum()) for m in masks)
    return {"plain": t, "amortised": t, "trainable_params": n,
            "trainable_bytes": state_bytes(params) * 2 + sum(
                state_bytes([s["exp_avg"], s["exp_avg_sq"]]) for s in opt.state.values()),
            "mask_bytes": sum(m.numel() for m in masks)}


def gather_cost_ratio(tokens: int, d_out: int, d_in: int, repeats: int) -> dict:
    """Time both kernels' extra work on one matrix at several densities; report the
    matmul-multiply-adds one gathered multiply-add costs (the cost rule's ratio)."""
    x = torch.randn(tokens, d_in)
    w = torch.randn(d_out, d_in)
    g = torch.randn(tokens, d_out)
    out = {}
    for density in (0.002, 0.01, 0.05):
        k = int(density * d_out * d_in)
        pos = torch.randperm(d_out * d_in)[:k].sort().values
        vals = torch.randn(k, requires_grad=True)
        xr = x.clone().requires_grad_(True)

        def run(kernel):
            linear_sparse_delta(xr, w, None, pos, vals, kernel).backward(g)
        t_dense, t_gather = timed(lambda: run("dense"), repeats), timed(lambda: run("gather"), repeats)
        plain = timed(lambda: torch.nn.functional.linear(xr, w).backward(g), repeats)
        extra_dense, extra_gather = max(t_dense - plain, 1e-9), max(t_gather - plain, 1e-9)
        # dense extra ~ 2·T·n matmul MACs; gather extra ~ 3·T·K gathered MACs
        ratio = (extra_gather / (3 * tokens * k)) / (extra_dense / (2 * tokens * d_out * d_in))
        out[density] = {"dense_ms": t_dense * 1e3, "gather_ms": t_gather * 1e3,
                        "plain_ms": plain * 1e3, "ratio": ratio}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: random SmolLM2-135M shape)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers kept (0: all of --model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank; SEFT gets K = rank·(d_in+d_out)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--kernel", default="auto", choices=["auto", "dense", "gather"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = build(args)
    vocab = base.config.vocab_size
    ids = torch.randint(vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
          f"{base.config.num_hidden_layers} layers; batch {args.batch}x{args.seq}; "
          f"rank {args.rank}; sparsity {args.sparsity}; threads {torch.get_num_threads()}")
    res = {"seft": bench_seft(copy.deepcopy(base), batch, args),
           "lora": bench_lora(copy.deepcopy(base), batch, args),
           "static": bench_static(copy.deepcopy(base), batch, args)}
    lora = res["lora"]
    print(f"\n{'method':8} {'step ms':>9} {'x LoRA':>7} {'trainable':>11} {'state MiB':>10} {'x LoRA':>7}")
    for name, r in res.items():
        print(f"{name:8} {r['amortised'] * 1e3:9.1f} {r['amortised'] / lora['amortised']:7.2f} "
              f"{r['trainable_params']:11,d} {r['trainable_bytes'] / 2**20:10.2f} "
              f"{r['trainable_bytes'] / lora['trainable_bytes']:7.2f}")
    s = res["seft"]
    print(f"\nSEFT ({'/'.join(s['kernels'])} kernel): plain step {s['plain'] * 1e3:.1f} ms "
          f"({s['plain'] / lora['plain']:.2f}x LoRA), selection-window step {s['window'] * 1e3:.1f} ms "
          f"({s['window'] / lora['plain']:.2f}x), topology update {s['update'] * 1e3:.1f} ms "
          f"({s['update'] / s['plain']:.2f} plain steps); amortised over ΔT=10, A=5: "
          f"{s['amortised'] / lora['amortised']:.2f}x LoRA (target <= 1.2)")
    print(f"SEFT trainable state {s['trainable_bytes'] / 2**20:.2f} MiB + slot indices "
          f"{s['index_bytes'] / 2**20:.2f} MiB vs LoRA {lora['trainable_bytes'] / 2**20:.2f} MiB "
          f"(target: <= LoRA + indices: {s['trainable_bytes'] <= lora['trainable_bytes'] + s['index_bytes']}); "
          f"support mask {s['mask_bytes'] / 2**20:.2f} MiB (1 byte per target weight, as the "
          f"static baseline's mask {res['static']['mask_bytes'] / 2**20:.2f} MiB)")
    h = base.config.hidden_size
    print(f"\nkernel cost ratio on a {h}x{h} matrix, {args.batch * args.seq} tokens:")
    for density, r in gather_cost_ratio(args.batch * args.seq, h, h, args.repeats).items():
        print(f"  density {density:<6} dense {r['dense_ms']:7.2f} ms  gather {r['gather_ms']:7.2f} ms  "
              f"plain {r['plain_ms']:7.2f} ms  -> gather_cost_ratio ≈ {r['ratio']:.1f}")


if __name__ == "__main__":
    main()
