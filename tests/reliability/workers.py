"""Runs killed at chosen points, for tests/reliability. Each `*_worker` is a module-level function
run in a process forked from the warm forkserver of tests/distributed/harness.py (imports paid
once); it patches one function of the package so that the process SIGKILLs itself at a known
point — a kill -9 at that instant, without racing a timer — and then runs seft-train's main."""
from __future__ import annotations

import os
import signal

from tests.distributed import harness


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def freeze() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)  # alive and silent, as a hung GPU or filesystem leaves it


def after_checkpoint_file(step: int, then) -> None:
    """`then()` once this process has written its rank file of checkpoint `step`."""
    import seft_scale.checkpoint as checkpoint
    real_save = checkpoint.save_file

    def save_file(tensors, path, *a, **k):
        real_save(tensors, path, *a, **k)
        if f"step_{step:08d}" in path:
            then()
    checkpoint.save_file = save_file


def at_step(step: int, then) -> None:
    """`then()` when step `step` reaches its optimizer update (lr_at is asked for its rate)."""
    import seft_scale.train as train_mod
    real_lr = train_mod.lr_at

    def lr_at(n, t):
        if n == step:
            then()
        return real_lr(n, t)
    train_mod.lr_at = lr_at


def kill_at(point: str, argv: list[str], arg=None) -> None:
    """seft-train `argv`, killed at `point`:
    prune        inside pruning, before anything of the start model is saved;
    start_write  after half of the start model's model.safetensors is on disk;
    export_write after half of the export's model.safetensors is on disk;
    report       after the export is in place, before report.json is written;
    checkpoint   after the rank file of checkpoint `arg` (a step) is written, before trainer.json;
    step         at the start of step `arg`'s optimizer update (between checkpoints)."""
    import torch

    import seft_scale.backends.local as local
    import seft_scale.export as export
    import seft_scale.run as run
    from seft_scale.cli.train import main

    torch.set_num_threads(1)  # as the suite's own runs (tests/reliability/conftest.py)
    if point == "prune":
        run.prune_model = lambda *a, **k: die()
    elif point in ("start_write", "export_write"):
        def save_model(model, tok, out):
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, safe_serialization=True)
            weights = out / "model.safetensors"
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
            die()
        if point == "start_write":
            run.save_model = save_model
        else:
            local.save_model = save_model
    elif point == "report":
        export.write_text_atomic = lambda path, text: die()
    elif point == "checkpoint":
        after_checkpoint_file(arg, die)
    elif point == "step":
        at_step(arg, die)
    else:
        raise ValueError(point)
    main(argv)


def run_killed(point: str, argv: list[str], arg=None, timeout_s: float = 300) -> int:
    """The exit code of seft-train `argv` killed at `point` in a forked process (-9 if it was)."""
    proc = harness.start_process(kill_at, point, argv, arg)
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
    return proc.exitcode


def fsdp_worker(rank, world, argv: list[str], kill: str | None = None, step: int = 0):
    """seft-train `argv` (--backend fsdp) on this gloo rank; returns its exit status. kill='die':
    rank 1 SIGKILLs itself after writing its file of checkpoint `step`; kill='freeze': rank 1
    stops itself (SIGSTOP: alive and silent, as a hung GPU or filesystem leaves a process) when
    step `step` reaches its optimizer update."""
    from seft_scale.cli.train import main

    if rank == 1 and kill == "die":
        after_checkpoint_file(step, die)
    if rank == 1 and kill == "freeze":
        at_step(step, freeze)
    return main(argv)


def slow_rank0_worker(rank, world, delay_s: float) -> list[str]:
    """Rank 0 arrives `delay_s` late (longer than SEFT_DIST_TIMEOUT) at a Comm.wait, then at a
    plain barrier; what each rank saw."""
    import time

    from seft_scale.backends.comm import Comm, PeerFailure

    comm, seen = Comm(), []
    for name, sync in (("wait", lambda: comm.wait("rank 0 working alone")), ("barrier", comm.barrier)):
        if rank == 0:
            time.sleep(delay_s)  # the late rank: elapsed time is what is tested
        try:
            sync()
            seen.append(f"{name} ok")
        except PeerFailure:
            seen.append(f"{name} failed")
            break
    return seen
