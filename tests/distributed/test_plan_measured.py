"""seft_scale/plan.py's formula against per-rank memory measured on real CPU runs: the local
backend at W = 1 and the sharded backends at W = 2 and 3 (forked gloo ranks).

How memory is measured, per rank, on a magnitude-pruned Llama (2 layers; 3 ranks split its rows
unevenly), fp32 and bf16:
* resident state by exact tensor accounting: the bytes of every parameter storage this rank holds
  (padded shards included) and of every SparseDelta tensor (slots, δ-grad, Adam moments, ages,
  support mask, θ-edit bitmap);
* transients as the heap's peak: glibc's mallinfo2 (bytes in use in malloc'd and mmap'd chunks,
  which is where torch's CPU allocator gets its memory) sampled after every aten op of the phase
  by a TorchDispatchMode, minus the bytes in use just before it. Measured after one warm-up round
  of every phase, so one-time allocations (BLAS, gloo buffers) are not counted.
The 10 % bound covers, on every rank: the θ shard, ZeRO-3's persistent whole parameters, the SEFT
slots + optimizer + mask, the G accumulator, and the peak of a training step, of a selection-window
step and of a topology update, each above the resident state. Seen (plan vs measured): resident
state within 1 %; phase peaks within 5 %, except the FSDP window step, measured ~5 % above the plan
at its peak, FSDP's backward-prefetch all-gather; we attribute that to gloo's all-gather staging
the output in a flat copy, which NCCL does not make. The FSDP step is checked as an upper bound:
whether that all-gather's output is alive at the step's peak depends on gloo's worker thread. With activation checkpointing the FSDP window
step is ~11 % below the plan (checked as an upper bound within 15 %); the ZeRO-3 update is checked
as an upper bound too (the plan's refresh line re-gathers the largest target).
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from tests.conftest import ROOT
from tests.distributed import harness

SEFT = dict(lora_rank=8, update_interval=4, window=2)
SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4)
BATCH, SEQ = 2, 64


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_in_use() -> int:
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


def heap_peak(fn) -> int:
    """Peak heap bytes in use while fn() runs, above the bytes in use when it starts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Peak(TorchDispatchMode):
        peak = heap_in_use()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Peak.peak = max(Peak.peak, heap_in_use())
            return out

    start = Peak.peak
    with Peak():
        fn()
    return Peak.peak - start


def measure_worker(rank, world, backend_name, model_dir, dtype="float32", zero=None, checkpointing=False,
                   scores="candidates"):
    """Build the backend, attach SEFT, then measure resident state and the three phase peaks."""
    from seft_scale.backends import make_backend
    from seft_scale.backends.local import LocalBackend
    from seft_scale.config import ModelConfig, RunConfig, SeftConfig, TrainConfig
    from seft_scale.model import find_targets
    from seft_scale.seft.method import SeftMethod

    # an update every 4 steps after a 2-step window: steps 1, 2 plain, 3 the window's first (dense
    # G, candidates chosen), 4 a later window step (G sampled at the candidates) + the update
    cfg = RunConfig(model=ModelConfig(path=model_dir, dtype=dtype), train=TrainConfig(steps=1000),
                    seft=SeftConfig(**SEFT, window_scores=scores))
    backend = LocalBackend(torch.device("cpu")) if backend_name == "local" \
        else make_backend(backend_name, cfg=cfg, ds_config=zero and ds_config(zero))
    model, _ = backend.load_model(cfg.model, path=model_dir)
    model = backend.wrap(model)
    method = SeftMethod(cfg, backend, model, find_targets(model, cfg.seft.targets))
    deltas = method.deltas
    if checkpointing:  # as train.py does for train.activation_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    method.init_state()
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
    batch = {"input_ids": ids, "labels": ids}

    def forward_backward(step: int):
        method.before_step(step)
        (model(**batch).loss / world).backward()

    for t in (1, 2, 3, 4):  # warm-up: one-time allocations happen here
        forward_backward(t)
        method.after_backward(t, 1e-3)
    out = {"step": heap_peak(lambda: (forward_backward(5), method.after_backward(5, 1e-3)))}
    forward_backward(6)
    method.after_backward(6, 1e-3)
    first = heap_peak(lambda: (forward_backward(7), method.after_backward(7, 1e-3)))
    scores_bytes = sum(t.numel() * t.element_size() for d in deltas for t in window_tensors(d.window))
    later = heap_peak(lambda: forward_backward(8)) + scores_bytes  # the scores were there before
    out.update(window=max(first, later), scores=scores_bytes)
    out["update"] = heap_peak(lambda: method.after_backward(8, 1e-3))

    def storage_bytes(t):
        return t.untyped_storage().nbytes()
    params = list(model.parameters())
    out["theta"] = sum(storage_bytes(p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p))
                       for p in params)
    out["persistent"] = sum(storage_bytes(p.data) for p in params if getattr(p, "ds_persist", False))
    out["slots"] = sum(t.numel() * t.element_size() for d in deltas  # δ twice: δ-grad, same size,
                       for t in (d.pos, d.values, d.values, d.exp_avg, d.exp_avg_sq, d.age, d.since_grown))  # lives
    out["edits"] = sum(d.edited.bits.numel() for d in deltas)
    return out


def window_tensors(window):
    """The tensors a window's scores keep (seft/window.py): its own attributes, not properties
    (DenseWindow.pos builds its positions when asked)."""
    names = ("sum", "sumsq", "step", "pos", "sets", "slot_at", "sampled_at", "sampled")
    return [t for t in (vars(window).get(n) for n in names) if isinstance(t, torch.Tensor)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A magnitude-pruned fp32 Llama whose matrices 3 ranks split unevenly (rows 256, 128, 688)."""
    from seft_scale.config import ModelConfig, TinyModelConfig
    from seft_scale.model import build_tiny_llama, find_targets, save_model, train_tokenizer
    from seft_scale.prune.magnitude import prune_magnitude
    out = tmp_path_factory.mktemp("plan_model")
    tok = train_tokenizer((ROOT / "configs" / "data" / "tempest.txt").read_text()[:40000], 1024)
    model = build_tiny_llama(ModelConfig(tiny=TinyModelConfig(**SHAPE)), len(tok), torch.float32, "sdpa")
    prune_magnitude(find_targets(model, [".*_proj"]), 0.5)
    save_model(model, tok, out)
    return str(out)


def ds_config(zero: dict) -> dict:
    """configs/ds/zero3.json with `zero` merged into its zero_optimization."""
    import json
    ds = json.loads((ROOT / "configs" / "ds" / "zero3.json").read_text())
    ds["zero_optimization"].update(zero)
    return ds


def planned(model_dir, backend, world, dtype="float32", zero=None, checkpointing=False,
            scores="candidates"):
    """The formula's figures for the measured run."""
    import json
    from pathlib import Path

    from seft_scale.config import SeftConfig
    from seft_scale.plan import ModelShape, PlanInput, plan_memory
    shape = ModelShape.from_hf(json.loads((Path(model_dir) / "config.json").read_text()), model_dir)
    return plan_memory(PlanInput(
        shape=shape, seft=SeftConfig(**SEFT, window_scores=scores),
        world=world, backend=backend, dtype=dtype, compute_dtype=dtype, micro_batch=BATCH,
        seq_len=SEQ, zero=ds_config(zero or {})["zero_optimization"] if backend == "zero3" else {},
        activation_checkpointing=checkpointing))


CASES = [("local", 1, "float32", None, False, "candidates"), ("fsdp", 2, "float32", None, False, "candidates"),
         ("fsdp", 3, "float32", None, False, "candidates"), ("zero3", 2, "float32", {}, False, "candidates"),
         ("zero3", 3, "float32", {"stage3_param_persistence_threshold": 0}, False, "candidates"),
         ("local", 1, "bfloat16", None, False, "candidates"), ("local", 1, "float32", None, True, "candidates"),
         ("fsdp", 2, "float32", None, True, "candidates"), ("local", 1, "float32", None, False, "dense"),
         ("fsdp", 2, "float32", None, False, "dense")]


@pytest.mark.parametrize("backend,world,dtype,zero,checkpointing,scores", CASES,
                         ids=[f"{b}-W{w}-{d}{'-persist0' if z else ''}{'-ckpt' if c else ''}-{sc}"
                              for b, w, d, z, c, sc in CASES])
def test_formula_within_10_percent_of_measured(model_dir, backend, world, dtype, zero, checkpointing,
                                               scores):
    """Every figure is planned for the worst rank: no rank holds over 10 % more than the plan,
    and the rank holding the most is within 10 % of it (ranks differ: slots are not split evenly,
    and the plan assumes K/W on each)."""
    plan = planned(model_dir, backend, world, dtype, zero, checkpointing, scores)
    resident = plan.resident  # the phases are measured above what the rank holds before them
    window_scores = plan.get(f"window scores ({scores})")
    want = {"theta": plan.get("θ shard"), "persistent": plan.get("ZeRO-3 persistent params"),
            "slots": plan.get("SEFT slots + optimizer"), "edits": plan.get("θ-edit bitmap (host memory)"),
            "step": plan.step_peak - resident, "window": plan.window_peak - resident,
            "scores": window_scores, "update": plan.update_peak - resident - window_scores}
    ranks = harness.run_world(measure_worker, world, backend, model_dir, dtype, zero, checkpointing,
                              scores, env={"TORCH_FR_BUFFER_SIZE": "0"})
    for rank, got in enumerate(ranks):
        print(f"{backend} W={world} {dtype} {scores} rank {rank}: " + ", ".join(
            f"{k} {got[k] / 1e6:.3f}/{v / 1e6:.3f} MB" for k, v in want.items()))
    for key, planned_bytes in want.items():
        most = max(got[key] for got in ranks)  # every upper bound holds for each rank through it
        msg = (f"{key}: measured {', '.join(f'{got[key] / 1e6:.3f}' for got in ranks)} MB "
               f"(ranks 0..{world - 1}), planned {planned_bytes / 1e6:.3f} MB")
        if backend == "zero3" and key == "update":
            # an upper bound: the plan counts re-gathering the largest target after the θ
            # edits, which happens only if ZeRO holds it gathered then; without that line the
            # plan must still cover the update's own scratch
            refresh = plan.get("ZeRO-3 refresh of a gathered target")
            assert planned_bytes - refresh <= most * 1.10 and most <= planned_bytes * 1.10, msg
        elif backend == "fsdp" and key == "step":
            # an upper bound: the plan counts FSDP2's all-gather output (a true buffer under
            # NCCL) at the backward prefetch; gloo fills it on its worker thread, so whether it
            # is alive at the step's peak varies from run to run (13.9 or 15.9 MB measured at W=2)
            buffer = plan.get("FSDP all-gather buffer")
            assert planned_bytes - buffer <= most * 1.10 and most <= planned_bytes * 1.10, msg
        elif backend == "fsdp" and checkpointing and key == "window":
            # the plan counts the recomputed layer's MLP gradients beside the window's dense G;
            # at FSDP W=2 they are measured not to coexist: the plan is ~11 % above, on the safe side
            assert most <= planned_bytes * 1.10 and planned_bytes <= most * 1.15, msg
        else:
            assert most == pytest.approx(planned_bytes, rel=0.10, abs=1024), msg
