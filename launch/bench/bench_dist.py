#!/usr/bin/env python
"""Traffic and cost of SEFT's global selection across ranks.

    python launch/bench/bench_dist.py                    # both parts (~3-4 min on 2 CPU cores)
    python launch/bench/bench_dist.py --part synthetic   # 1 only;  --part tiny: 2 only
    python launch/bench/bench_dist.py --sizes 0.0625 0.25 1 --worlds 2 3 8 64

1. Llama-2-7B-shaped layers, sharded in one process. The real `topology_update` (drop -> grow ->
   adapt) runs on real SparseDelta shards of one decoder layer (q,k,v,o 4096x4096, gate/up
   11008x4096, down 4096x11008; 50% pruned, K = 32·(d_in + d_out) slots), one thread per
   simulated rank (tests/helpers.ThreadGroup: a sum all-reduce), with every all-reduce counted
   by a wrapper. Synthetic data, the same at every W: θ ~ N(0, 0.02²) magnitude-pruned, in bf16;
   window G = N(0,1)·lognormal row scale·lognormal(σ=1) column scale (outlier input channels),
   rounded to bf16 as a bf16 backward matmul produces it, so many values tie exactly; δ ~
   N(0, 1e-3²) with 1% exact zeros. Shards in ZeRO-3's flat layout (ceil(n/W) per rank). A
   layer "xs" has every dimension times √s (x0.25: both halved). The update's scratch is ~40 B per
   weight over all shards (one layer at a time): ~9 GB of peak RSS at x1; a x4 layer would need
   ~34 GB (`--sizes 4 --full-worlds 64` where memory allows).
2. The tiny run (configs/runs/tiny.yaml, 40 steps, updates at 10/20/30) through train() on the
   real fsdp and zero3 backends at W = 1, 2, 3 (gloo ranks forked by tests/distributed/harness):
   the backend's all-reduce is wrapped to count what the topology updates send, the updates are
   timed, and step times come from the run's metrics.jsonl. The global batch grows with W
   (train.micro_batch_size per rank), so G, and with it the radix rounds, differ between W.

Traffic model (per rank, per topology update). Selection payload P = the bytes of every tensor
the update all-reduces (histograms [matrices, 256] int64 per radix round, and three small count
tensors). Wire bytes of a ring all-reduce: each rank sends 2(W-1)/W·P. The alternative, an
all-gather of every candidate's fp32 score (grow: the positions without a slot; drop: the slots;
adapt: the support), sends (W-1)/W·4 B·candidates per rank in a ring — a lower bound, since the
positions of sparse candidate sets would travel too. Both come from measured counts;
the ratio of wire bytes is 2P / (4 B·candidates) at any W > 1. A 32-layer model runs 32 such
per-layer updates (seft/method.layer_groups), so its figure is 32x one layer's (and never more than
32x the bound of selection.rounds_needed_upper_bound() rounds per selection).
Figures only; the targets are printed with whether this run met them.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the benchmark reuses the test harness of the checkout (tests/)

import torch  # noqa: E402

import seft_scale.seft.topology as topology  # noqa: E402
from seft_scale.config import SeftConfig  # noqa: E402
from seft_scale.seft.budget import slot_capacity  # noqa: E402
from seft_scale.seft.delta import SparseDelta  # noqa: E402
from seft_scale.seft.optim import SlotAdamW  # noqa: E402
from seft_scale.seft.selection import rounds_needed_upper_bound  # noqa: E402
from seft_scale.seft.topology import check_budget, topology_update  # noqa: E402
from seft_scale.seft.window import DenseWindow  # noqa: E402

TINY = ROOT / "configs" / "runs" / "tiny.yaml"
LAYERS_7B = 32
SELECTIONS = ("drop", "grow", "adapt")  # the order topology_update runs them in


def layer_shapes(scale: float) -> dict[str, tuple[int, int]]:
    """One Llama-2-7B decoder layer's target matrices, every dimension times sqrt(scale)."""
    f = scale ** 0.5
    h, ffn = round(4096 * f), round(11008 * f)
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (ffn, h), "up_proj": (ffn, h), "down_proj": (h, ffn)}


# -- counting --------------------------------------------------------------------------------------
@dataclass
class Traffic:
    """What one rank all-reduced: per call the tensor's bytes, labelled with the selection running
    (drop / grow / adapt) or 'counts' for topology_update's small per-matrix count tensors."""

    calls: list[tuple[str, int]] = field(default_factory=list)
    candidates: dict[str, int] = field(default_factory=dict)  # this rank's, per selection

    @property
    def payload(self) -> int:
        return sum(b for _, b in self.calls)

    def rounds(self, label: str) -> int:
        return sum(1 for lab, _ in self.calls if lab == label)


class CountingAllreduce:
    """Wraps a sum all-reduce; counts tensor bytes while `active`. Calls made inside a select_topk
    (see `labelled_selections`) are labelled with its selection, the others 'counts'."""

    def __init__(self, inner):
        self.inner, self.active = inner, False
        self.traffic, self.phase, self.index = Traffic(), None, 0

    def begin_update(self) -> None:
        """A topology_update starts: its selections run in the order of SELECTIONS."""
        self.index = 0

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            self.traffic.calls.append((self.phase or "counts", t.numel() * t.element_size()))
        return self.inner(t) if self.inner is not None else t


class labelled_selections:
    """While entered, topology_update's select_topk calls tell their CountingAllreduce which
    selection runs and how many local candidates it scores; the real selector runs as it is."""

    def __enter__(self):
        self.real = real = topology.select_topk

        def select_topk(scores, positions, k, largest=True, allreduce=None):
            if not isinstance(allreduce, CountingAllreduce) or not allreduce.active:
                return real(scores, positions, k, largest, allreduce)
            phase = allreduce.phase = SELECTIONS[allreduce.index]
            allreduce.index += 1
            cand = allreduce.traffic.candidates
            cand[phase] = cand.get(phase, 0) + sum(s.numel() for s in scores)
            try:
                return real(scores, positions, k, largest, allreduce)
            finally:
                allreduce.phase = None
        topology.select_topk = select_topk
        return self

    def __exit__(self, *exc):
        topology.select_topk = self.real


# -- part 1: 7B-shaped layers, shards simulated by threads ----------------------------------------
@dataclass
class Matrix:
    """One target matrix of the synthetic layer, whole (the shards are views into it)."""

    name: str
    shape: tuple[int, int]
    theta: torch.Tensor  # bf16, pruned
    mask: torch.Tensor
    grad: torch.Tensor  # window G, fp32
    pos: torch.Tensor  # slot positions, sorted
    delta: torch.Tensor
    budget: int
    capacity: int


def synthetic_matrix(name: str, shape: tuple[int, int], seed: int, sparsity: float,
                     seft: SeftConfig) -> Matrix:
    """The module docstring's synthetic θ, G, slots and δ for one matrix (seeded: same at any W)."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    n = d_out * d_in
    theta = torch.randn(n, generator=g).mul_(0.02)
    sample = theta[torch.randint(n, (1 << 20,), generator=g)].abs()
    theta.masked_fill_(theta.abs() <= sample.quantile(sparsity), 0.0)  # magnitude pruning
    theta = theta.to(torch.bfloat16)
    mask = theta != 0
    row = torch.randn(d_out, 1, generator=g).mul_(0.5).exp_()
    col = torch.randn(1, d_in, generator=g).exp_()
    grad = torch.randn(d_out, d_in, generator=g).mul_(row).mul_(col).mul_(1e-3)
    grad = grad.to(torch.bfloat16).to(torch.float32).view(-1)
    k = slot_capacity(shape, seft)
    cand = torch.randint(n, (3 * k,), generator=g).unique()
    cand = cand[mask[cand]]
    pos = cand[torch.randperm(len(cand), generator=g)[:k]].sort().values
    delta = torch.randn(k, generator=g).mul_(1e-3)
    delta[torch.rand(k, generator=g) < 0.01] = 0.0
    return Matrix(name, shape, theta, mask, grad, pos, delta, int(mask.sum()), k)


def shard(m: Matrix, rank: int, world: int, opt: SlotAdamW) -> SparseDelta:
    """Rank's SparseDelta of `m` in ZeRO-3's layout (ceil(n/W) flat elements per rank)."""
    from tests.helpers import shard_bounds
    lo, hi = shard_bounds(m.theta.numel(), world, rank)
    d = SparseDelta(m.name, m.shape, lo, m.theta[lo:hi], m.budget, m.capacity)
    a, b = torch.searchsorted(m.pos, torch.tensor([lo, hi])).tolist()
    zero = torch.zeros(b - a)
    d.add_slots(m.pos[a:b], *opt.seed(zero, zero, 0))
    d.values = m.delta[a:b].clone().requires_grad_(True)
    d.window = DenseWindow(d)  # the most candidates an update can score: every position
    d.window.add(m.grad[lo:hi])
    d.window.end_step(1.0)
    return d


def synthetic_update(scale: float, world: int, seed: int, drop_rate: float, sparsity: float) -> dict:
    """One topology update of one synthetic layer at `world` simulated ranks."""
    from tests.helpers import ThreadGroup
    seft = SeftConfig(lora_rank=32, drop_rate=drop_rate)
    layer = [synthetic_matrix(name, shape, seed + i, sparsity, seft)
             for i, (name, shape) in enumerate(layer_shapes(scale).items())]
    opt = SlotAdamW(1e-3)

    def rank_fn(rank, allreduce):
        deltas = [shard(m, rank, world, opt) for m in layer]
        counting = CountingAllreduce(allreduce)
        counting.active = True
        counting.begin_update()
        t0 = time.perf_counter()
        topology_update(deltas, drop_rate, opt.seed, allreduce=counting)
        elapsed = time.perf_counter() - t0
        counting.active = False
        check_budget(deltas, allreduce)  # the update it measured was a correct one
        return counting.traffic, elapsed

    with labelled_selections():
        results = ThreadGroup(world).run(rank_fn)
    if any(r is None for r in results):
        raise RuntimeError("a simulated rank did not finish within ThreadGroup's 120 s")
    traffic = [t for t, _ in results]
    if any(t.calls != traffic[0].calls for t in traffic):
        raise AssertionError("ranks all-reduced different tensors")
    out = {"scale": scale, "world": world, "matrices": len(layer),
           "numel": sum(m.theta.numel() for m in layer), "calls": traffic[0].calls,
           "payload": traffic[0].payload, "rounds": {s: traffic[0].rounds(s) for s in SELECTIONS},
           "candidates": sum(sum(t.candidates.values()) for t in traffic),
           "seconds": max(s for _, s in results)}
    return out  # the layer is freed here: one layer in memory at a time


def ring_allreduce_wire(payload: float, world: int) -> float:
    """Bytes one rank sends in a ring all-reduce of `payload` bytes (reduce-scatter + all-gather)."""
    return 2 * (world - 1) / world * payload


def ring_allgather_wire(total: float, world: int) -> float:
    """Bytes one rank sends in a ring all-gather whose result is `total` bytes."""
    return (world - 1) / world * total


def nbytes(x: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= div:
            return f"{x / div:,.2f} {unit}"
    return f"{x:,.0f} B"


def part_synthetic(sizes, worlds, full_worlds, seed: int, drop_rate: float,
                   sparsity: float) -> list[tuple[str, bool]]:
    print("\n== 1. selection traffic per topology update: Llama-2-7B-shaped layers, synthetic, "
          f"{sparsity:.0%} pruned, K = 32·(d_in+d_out), drop fraction {drop_rate}, shards "
          "simulated by threads ==", flush=True)
    runs = []
    for scale in sizes:
        for world in (full_worlds if scale >= 1 else worlds):
            r = synthetic_update(scale, world, seed, drop_rate, sparsity)
            gc.collect()
            runs.append(r)
            print(f"  layer x{scale:g} ({r['numel'] / 1e6:.1f}M weights), W={world}: update "
                  f"{r['seconds']:.1f} s for all ranks on this machine; process peak RSS so far "
                  f"{peak_rss() / 1e9:.1f} GB", flush=True)
    matrices = runs[0]["matrices"]
    bound = 3 * rounds_needed_upper_bound() * matrices * 256 * 8 + matrices * (8 + 8 + 32)
    print(f"\n  per rank, one layer:\n  {'layer':>7} {'weights':>8} {'W':>3} {'all-red.':>8} "
          f"{'rounds d/g/a':>12} {'payload':>11} {'ring wire':>10} {'all-gather':>11} {'wire ratio':>10}")
    for r in runs:
        w = r["world"]
        wire, gather = ring_allreduce_wire(r["payload"], w), ring_allgather_wire(4 * r["candidates"], w)
        rd = "/".join(str(r["rounds"][s]) for s in SELECTIONS)
        print(f"  {'x' + format(r['scale'], 'g'):>7} {r['numel'] / 1e6:7.1f}M {w:3d} {len(r['calls']):8d} "
              f"{rd:>12} {r['payload']:9,d} B {nbytes(wire):>10} {nbytes(gather):>11} {wire / gather:10.4%}")
    print(f"  (size-independent bound: 3 selections x {rounds_needed_upper_bound()} rounds x "
          f"{matrices} matrices x 256 x 8 B + counts = {bound:,} B per layer)")
    seven = [r for r in runs if r["scale"] == 1]
    for r in seven:
        w = r["world"]
        print(f"\n  whole 32-layer model, per rank, W={w}: {LAYERS_7B * len(r['calls'])} all-reduces, "
              f"payload {nbytes(LAYERS_7B * r['payload'])} (bound {nbytes(LAYERS_7B * bound)}), ring "
              f"wire {nbytes(LAYERS_7B * ring_allreduce_wire(r['payload'], w))} vs all-gather of the "
              f"scores {nbytes(LAYERS_7B * ring_allgather_wire(4 * r['candidates'], w))}", end="")
    print()
    by_scale: dict[float, set] = {}
    for r in runs:
        by_scale.setdefault(r["scale"], set()).add(r["payload"])
    lo, hi = min(r["payload"] for r in runs), max(r["payload"] for r in runs)
    verdicts = [
        (f"selection payload independent of matrix size: {lo:,}..{hi:,} B per layer over layers of "
         f"{min(r['numel'] for r in runs) / 1e6:.1f}M..{max(r['numel'] for r in runs) / 1e6:.1f}M "
         f"weights, all within the size-independent bound {bound:,} B", hi <= bound),
        ("same selection payload at every W for a given layer",
         all(len(v) == 1 for v in by_scale.values())),
    ]
    if seven:
        ratio = max(ring_allreduce_wire(r["payload"], r["world"]) /
                    ring_allgather_wire(4 * r["candidates"], r["world"]) for r in seven)
        verdicts.append((f"selection wire bytes <= 0.1% of the all-gather at 7B shapes: {ratio:.4%}",
                         ratio <= 1e-3))
    return verdicts


def limit_malloc_arenas() -> None:
    """64 simulated ranks are 64 threads; glibc would give them up to 16 malloc arenas that keep
    freed shard-sized blocks (~1.5 GB extra RSS at a 7B layer). Two arenas, and blocks >= 4 MB
    straight from mmap, keep the process near the bytes it actually uses."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-8, 2)  # M_ARENA_MAX
    libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD


# -- part 2: the tiny run on the real backends, forked gloo ranks ----------------------------------
def seft_bytes(deltas) -> int:
    """Bytes of this rank's SparseDelta tensors: slots, δ and its gradient, Adam moments, ages,
    support exceptions, θ-edit bitmap (host) and (in selection windows) the window scores."""
    total = 0
    for d in deltas:
        window = d.window.state_dict().values() if d.window is not None else ()
        for t in (d.pos, d.values, d.values.grad, d.exp_avg, d.exp_avg_sq, d.age, d.zeros,
                  d.edited.bits, *window):
            total += 0 if t is None else t.numel() * t.element_size()
    return total


def tiny_worker(rank: int, world: int, backend_name: str, out_dir: str) -> dict:
    """The tiny run through train() on a real backend whose all-reduce is wrapped to count what the
    topology updates send; updates timed (topology_update of every layer + refresh)."""
    import seft_scale.seft.method as seft_method
    from seft_scale.backends import make_backend
    from seft_scale.config import load_config
    from seft_scale.train import train

    log = os.open(Path(out_dir).parent / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT)
    os.dup2(log, 1), os.dup2(log, 2)  # DeepSpeed's and the trainer's prints; the table is ours
    cfg = load_config(str(TINY))
    backend = make_backend(backend_name, cfg=cfg)
    counting = backend.comm.allreduce = CountingAllreduce(backend.comm.allreduce)
    probe = {"deltas": [], "updates": {}, "step": None, "peak": 0}

    def wrap(owner, name, around):
        real = getattr(owner, name)
        setattr(owner, name, lambda *a, **kw: around(real, *a, **kw))

    def capture(real, method, on):  # the SEFT state peaks in selection windows (G accumulators)
        real(method, on)
        probe["deltas"] = method.deltas
        probe["peak"] = max(probe["peak"], seft_bytes(method.deltas))

    def after_backward(real, method, step, lr):  # where SeftMethod runs the updates
        probe["step"], counting.traffic = step, Traffic()
        try:
            return real(method, step, lr)
        finally:
            probe["step"] = None

    def timed(count: bool):
        def around(real, *a, **kw):
            if probe["step"] is None:  # refresh also runs at resume: update steps only
                return real(*a, **kw)
            u = probe["updates"].setdefault(probe["step"], {"seconds": 0.0, "traffic": counting.traffic})
            counting.active = count
            counting.begin_update()
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                u["seconds"] += time.perf_counter() - t0
                counting.active = False
        return around

    wrap(seft_method.SeftMethod, "set_capture", capture)
    wrap(backend, "refresh", timed(count=False))  # propagating θ edits: timed, not selection
    wrap(seft_method, "topology_update", timed(count=True))
    wrap(seft_method.SeftMethod, "after_backward", after_backward)
    with labelled_selections():
        train(cfg, out_dir, backend=backend, progress=False)
    out = {"resident": seft_bytes(probe["deltas"]), "peak": probe["peak"],
           "numel": sum(d.length for d in probe["deltas"]),
           "updates": {step: {"seconds": u["seconds"], "calls": u["traffic"].calls,
                              "candidates": sum(u["traffic"].candidates.values())}
                       for step, u in probe["updates"].items()}}
    if rank == 0:
        out["metrics"] = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").open()]
    return out


def tiny_case(backend_name: str, world: int) -> dict:
    from seft_scale.config import load_config
    from seft_scale.seft.schedule import in_window, is_update_step
    from tests.distributed.harness import run_world

    with tempfile.TemporaryDirectory() as tmp:
        ranks = run_world(tiny_worker, world, backend_name, str(Path(tmp) / "run"), timeout_s=300,
                          env={"PYTHONWARNINGS": "ignore"})
    s, t = load_config(str(TINY)).seft, load_config(str(TINY)).train
    steps = sorted(ranks[0]["updates"])
    for r in ranks[1:]:
        if [r["updates"][k]["calls"] for k in steps] != [ranks[0]["updates"][k]["calls"] for k in steps]:
            raise AssertionError("ranks all-reduced different tensors in the topology updates")
    kind = {m["step"]: "update" if is_update_step(m["step"], s.update_interval, t.steps) else
            "window" if in_window(m["step"], s.update_interval, s.window, t.steps) else "plain"
            for m in ranks[0]["metrics"]}
    times = {k: [m["step_time_s"] for m in ranks[0]["metrics"] if kind[m["step"]] == k]
             for k in ("plain", "window", "update")}
    upd = ranks[0]["updates"]
    return {"backend": backend_name, "world": world, "updates": len(steps),
            "payload": statistics.median(sum(b for _, b in upd[k]["calls"]) for k in steps),
            "calls": statistics.median(len(upd[k]["calls"]) for k in steps),
            "candidates": statistics.median(sum(r["updates"][k]["candidates"] for r in ranks)
                                            for k in steps),
            # the slowest rank's update, the median over the run's updates
            "update_s": statistics.median(max(r["updates"][k]["seconds"] for r in ranks) for k in steps),
            "plain_s": statistics.median(times["plain"]), "window_s": statistics.median(times["window"]),
            "resident": max(r["resident"] for r in ranks), "peak": max(r["peak"] for r in ranks),
            "numel": max(r["numel"] for r in ranks)}


def part_tiny(worlds) -> list[tuple[str, bool]]:
    print(f"\n== 2. the tiny run ({TINY.relative_to(ROOT)}) on the real backends, forked gloo "
          "ranks ==", flush=True)
    # the harness's fork server inherits this environment (it preloads deepspeed)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    rows = []
    for backend_name in ("fsdp", "zero3"):
        for world in worlds:
            t0 = time.perf_counter()
            rows.append(tiny_case(backend_name, world))
            print(f"  {backend_name} W={world}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\n  {'backend':7} {'W':>2} {'all-red.':>8} {'payload/rank':>13} {'ring wire':>10} "
          f"{'all-gather':>10} {'ratio':>6} {'plain step':>10} {'window st.':>10} {'update':>9} {'upd/step':>8} "
          f"{'SEFT/rank':>10} {'peak':>10} {'x W=1':>6}")
    verdicts = []
    for r in rows:
        w = r["world"]
        one = next(x for x in rows if x["backend"] == r["backend"] and x["world"] == min(worlds))
        wire, gather = ring_allreduce_wire(r["payload"], w), ring_allgather_wire(4 * r["candidates"], w)
        print(f"  {r['backend']:7} {w:2d} {r['calls']:8.0f} {r['payload']:11,.0f} B {wire:8,.0f} B "
              f"{gather:8,.0f} B {f'{wire / gather:.0%}' if gather else '-':>6} {r['plain_s'] * 1e3:7.1f} ms {r['window_s'] * 1e3:7.1f} ms "
              f"{r['update_s'] * 1e3:6.1f} ms {r['update_s'] / r['plain_s']:8.2f} "
              f"{r['resident'] / 1e3:7.1f} kB {r['peak'] / 1e3:7.1f} kB "
              f"{r['resident'] / one['resident']:6.2f}")
        verdicts.append((f"{r['backend']} W={w}: topology update ({r['update_s'] * 1e3:.1f} ms) "
                         f"<= one training step ({r['plain_s'] * 1e3:.1f} ms)",
                         r["update_s"] <= r["plain_s"]))
    print("  (per rank; payload and all-reduces per topology update, both layers; ring wire = "
          "2(W-1)/W x payload; all-gather = (W-1)/W x 4 B x candidates, ratio = wire / all-gather; step times: medians of "
          "metrics.jsonl; update: median over the run's updates of the slowest rank's topology_update "
          "calls + refresh; SEFT/rank: SparseDelta tensors at the end, peak: in a window, with G)")
    return verdicts


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "synthetic", "tiny"], default="all")
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.0625, 0.25, 1.0],
                    help="layer sizes relative to a Llama-2-7B layer (202M weights; ~8.5 GB of "
                         "memory for all its shards' update scratch)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 8, 64],
                    help="simulated ranks for the layers smaller than x1")
    ap.add_argument("--full-worlds", type=int, nargs="+", default=[8, 64],
                    help="simulated ranks for layers of x1 and more (~40 s each here)")
    ap.add_argument("--tiny-worlds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-rate", type=float, default=0.2, help="p0 of the 7B run configs")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    verdicts = []
    if args.part in ("all", "tiny"):  # first: its ranks fork from a server started now
        verdicts += part_tiny(args.tiny_worlds)
    if args.part in ("all", "synthetic"):
        limit_malloc_arenas()
        torch.set_num_threads(1)  # the simulated ranks' threads are the parallelism
        verdicts += part_synthetic(args.sizes, args.worlds, args.full_worlds, args.seed,
                                   args.drop_rate, args.sparsity)
    print(f"\n== targets (this run, {time.perf_counter() - t0:.0f} s; figures, not a test) ==")
    for text, ok in verdicts:
        print(f"  [{'met' if ok else 'NOT met'}] {text}")


if __name__ == "__main__":
    main()
