"""Run a function on `world` gloo ranks forked from a warm server process.

A `torchrun` per test costs 10-15 s of imports; here a forkserver imports torch, transformers,
deepspeed and seft_scale once (and computes nothing, so forked children are safe), then each test's
ranks fork from it in milliseconds. Every rank runs `fn(rank, world, *args)` inside an initialised
gloo process group; results come back pickled, and an exception on any rank fails the test with
that rank's traceback. Workers are module-level functions (they are pickled by reference).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback

_PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
            "seft_scale.train", "seft_scale.backends.comm", "deepspeed", "seft_scale.backends.zero3",
            "datasets"]
_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(_PRELOAD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, results, args, env, timeout_s):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                       "SEFT_DIST_TIMEOUT": str(timeout_s), **(env or {})})
    try:
        import torch
        torch.set_num_threads(1)
        from seft_scale.backends.comm import init_distributed
        init_distributed()
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def start_process(target, *args):
    """target(*args) in one process forked from the warm server (started; the caller joins it)."""
    proc = _ctx.Process(target=target, args=args)
    proc.start()
    return proc


def start_world(fn, world: int, *args, timeout_s: float = 120, env: dict | None = None):
    """Start fn(rank, world, *args) on `world` ranks and return at once: (processes, queue of
    (rank, "ok" | "error", result or traceback)). For tests that watch the ranks themselves
    (a rank that dies never reports); run_world waits for all of them."""
    port, results = free_port(), _ctx.Queue()
    procs = [_ctx.Process(target=_entry, args=(fn, r, world, port, results, args, env, timeout_s))
             for r in range(world)]
    for p in procs:
        p.start()
    return procs, results


def run_world(fn, world: int, *args, timeout_s: float = 120, env: dict | None = None,
              allow_failures: bool = False) -> list:
    """fn(rank, world, *args) on `world` ranks; returns results by rank.

    With allow_failures, a rank's traceback is returned as its result (as a string starting
    with 'Traceback') instead of failing; ranks that never report give None."""
    procs, results = start_world(fn, world, *args, timeout_s=timeout_s, env=env)
    out: list = [None] * world
    errors = []
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout_s + 30)
            if status == "error" and not allow_failures:
                errors.append(f"rank {rank}:\n{value}")
            out[rank] = value
    except queue.Empty:
        errors.append(f"no result from some ranks within {timeout_s + 30:.0f} s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    if errors and not allow_failures:
        raise AssertionError("\n".join(errors))
    return out
