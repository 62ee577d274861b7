"""Two gloo ranks on the FSDP backend: one killed while writing a checkpoint (the other stops at
once with a named error; a resume equals the uninterrupted run), one frozen (the other gives up
after SEFT_DIST_TIMEOUT), and waits for work one rank does alone, which must not count as hung."""
from __future__ import annotations

import json
import queue
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.backends import comm
from seft_scale.checkpoint import check_checkpoint
from seft_scale.errors import ConfigError
from tests.conftest import ROOT
from tests.distributed import harness
from tests.reliability.conftest import train_argv
from tests.reliability.workers import fsdp_worker, slow_rank0_worker


def fsdp(out, fast, resume=False):
    return train_argv(out, *fast, resume=resume) + ["--backend", "fsdp"]


def first_result(results, procs, within_s: float):
    try:
        return results.get(timeout=within_s)
    except queue.Empty:
        pytest.fail(f"no rank reported within {within_s} s")


def stop(procs):
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(10)


def test_one_rank_of_two_killed_while_writing_a_checkpoint(tmp_path, fast):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert harness.run_world(fsdp_worker, 2, fsdp(ref, fast), timeout_s=120) == [0, 0]
    procs, results = harness.start_world(fsdp_worker, 2, fsdp(run, fast), "die", 4, timeout_s=120)
    try:
        t0 = time.monotonic()
        rank, status, value = first_result(results, procs, 150)
        procs[1].join(30)
        assert procs[1].exitcode == -signal.SIGKILL
        assert rank == 0 and status == "error", value
        assert "PeerFailure: rank 0: a collective failed during every rank writing its checkpoint " \
               "file: another rank probably died" in value, value
        assert time.monotonic() - t0 < 60  # found out from the closed connection, not a timeout
    finally:
        stop(procs)
    ckpts = run / "checkpoints"
    assert check_checkpoint(ckpts / "step_00000002") is None and (ckpts / ".step_00000004.tmp").is_dir()
    assert not (ckpts / "step_00000004").exists()
    assert harness.run_world(fsdp_worker, 2, fsdp(run, fast, resume=True), timeout_s=120) == [0, 0]
    wa, wb = (load_file(str(r / "export" / "model.safetensors")) for r in (ref, run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda r: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_time_s")}
                       for x in (r / "metrics.jsonl").read_text().splitlines()]
    assert strip(ref) == strip(run)


def test_a_frozen_rank_stops_the_other_after_the_collective_timeout(tmp_path, fast):
    timeout_s = 5
    procs, results = harness.start_world(fsdp_worker, 2, fsdp(tmp_path / "run", fast), "freeze", 3,
                                         timeout_s=timeout_s)
    try:
        t0 = time.monotonic()
        rank, status, value = first_result(results, procs, 150)
        assert rank == 0 and status == "error", value
        assert "PeerFailure: rank 0: a collective failed during" in value and "died or hung" in value
        assert "after SEFT_DIST_TIMEOUT seconds" in value
        assert time.monotonic() - t0 >= timeout_s  # it waited the timeout for the silent rank
        assert procs[1].is_alive()  # frozen, not dead
    finally:
        stop(procs)
    assert check_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002") is None


def test_work_done_alone_is_waited_for_past_the_collective_timeout():
    """SEFT_DIST_TIMEOUT=1 s, rank 0 2.5 s late: Comm.wait (loading, pruning, saving) waits for
    it; a plain collective gives up."""
    seen = harness.run_world(slow_rank0_worker, 2, 2.5, timeout_s=1, allow_failures=True)
    assert seen[1] == ["wait ok", "barrier failed"], seen
    assert seen[0][0] == "wait ok", seen


def test_the_timeouts_have_cluster_defaults_documented_in_the_readme(monkeypatch):
    monkeypatch.delenv("SEFT_DIST_TIMEOUT", raising=False)
    assert comm.timeout_from_env("SEFT_DIST_TIMEOUT", comm.DEFAULT_TIMEOUT_S) == 300
    monkeypatch.setenv("SEFT_DIST_TIMEOUT", "45")
    assert comm.timeout_from_env("SEFT_DIST_TIMEOUT", comm.DEFAULT_TIMEOUT_S) == 45
    for bad in ("0", "soon", "inf"):
        monkeypatch.setenv("SEFT_DIST_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="SEFT_DIST_TIMEOUT: expected seconds"):
            comm.timeout_from_env("SEFT_DIST_TIMEOUT", comm.DEFAULT_TIMEOUT_S)
    readme = (ROOT / "README.md").read_text()
    assert f"SEFT_DIST_TIMEOUT=<seconds>` (default {comm.DEFAULT_TIMEOUT_S:.0f})" in readme
    assert f"SEFT_DIST_SETUP_TIMEOUT=<seconds>` (default {comm.DEFAULT_SETUP_TIMEOUT_S:.0f})" in readme
