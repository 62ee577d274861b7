"""A diverged run stops with one line (exit 1): no export, no report, and the checkpoints it had
stay complete — none is replaced by a non-finite one or deleted to make room for it."""
from __future__ import annotations

import pytest
import torch

import seft_scale.seft.method as seft_method
from seft_scale.checkpoint import check_checkpoint, step_dirs
from seft_scale.cli import train
from seft_scale.seft.method import SeftMethod
from tests.reliability.conftest import train_argv


def stopped(run, capsys, argv) -> str:
    rc = train.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not (run / "export").exists() and not (run / "report.json").exists()
    assert not list(run.glob(".export*"))
    return lines[0]


def complete_checkpoints(run) -> list[str]:
    found = step_dirs(run)
    assert all(check_checkpoint(c) is None for c in found)
    return sorted(c.name for c in found)


@pytest.mark.parametrize("method", ["seft", "static"])
def test_a_diverging_loss_stops_the_run_and_keeps_its_checkpoints(fast, tmp_path, capsys, method):
    run = tmp_path / "run"
    line = stopped(run, capsys, train_argv(run, *fast, f"method={method}", "train.lr=1e30",
                                           "train.warmup_steps=0", "train.checkpoint_every=1"))
    assert line.startswith("error: train: the loss is nan at step 2; the run stopped, its checkpoints "
                           f"up to {run / 'checkpoints' / 'step_00000001'} are kept, and nothing was "
                           "exported. Lower train.lr (now 1e+30)"), line
    assert complete_checkpoints(run) == ["step_00000001"]


def test_a_non_finite_gradient_stops_the_run_before_the_next_checkpoint(fast, tmp_path, capsys,
                                                                         monkeypatch):
    real, calls = seft_method.clip_slot_grads, {"n": 0}

    def clip(*a, **k):
        calls["n"] += 1
        norm, scale = real(*a, **k)
        return (float("inf") if calls["n"] == 3 else norm), scale
    monkeypatch.setattr(seft_method, "clip_slot_grads", clip)
    run = tmp_path / "run"
    line = stopped(run, capsys, train_argv(run, *fast, "train.checkpoint_every=1"))
    assert "train: the gradient norm is inf at step 3;" in line
    assert complete_checkpoints(run) == ["step_00000001", "step_00000002"]


def test_non_finite_state_is_never_written_over_a_good_checkpoint(fast, tmp_path, capsys, monkeypatch):
    real = SeftMethod.state_tensors

    def state_tensors(self):
        tensors = real(self)
        if self.opt_steps_seen == 2:  # poison the second checkpoint's state
            name = next(k for k in tensors if k.endswith("/values"))
            tensors[name] = torch.full_like(tensors[name], float("nan"))
        return tensors

    real_after = SeftMethod.after_backward

    def after_backward(self, step, lr):
        self.opt_steps_seen = step
        return real_after(self, step, lr)
    monkeypatch.setattr(SeftMethod, "state_tensors", state_tensors)
    monkeypatch.setattr(SeftMethod, "after_backward", after_backward)
    run = tmp_path / "run"
    line = stopped(run, capsys, train_argv(run, *fast, "train.checkpoint_every=1",
                                           "train.keep_checkpoints=1"))
    assert "train: the trained state holds non-finite values at step 2;" in line
    assert complete_checkpoints(run) == ["step_00000001"]  # keep=1 did not make room for it


def test_a_merged_model_that_evaluates_to_nan_is_not_exported(fast, tmp_path, capsys):
    run = tmp_path / "run"
    line = stopped(run, capsys, train_argv(run, *fast, "train.lr=1e30", "train.warmup_steps=0",
                                           "train.steps=1"))
    assert "train: the held-out loss of the merged model is nan at step 1;" in line, line
