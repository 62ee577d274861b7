"""kill -9 at every point a run writes, then `--resume`: the result equals the uninterrupted run,
bit for bit, and nothing a resume could not read is deleted.

The killed runs are forked from a warm server and SIGKILL themselves at the chosen instant
(tests/reliability/workers.py); the resumes run here. The tiny config runs 6 steps with a
checkpoint every 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.checkpoint import check_checkpoint
from seft_scale.cli import export, train
from tests.reliability.conftest import train_argv
from tests.reliability.workers import run_killed


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fast) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(train_argv(out, *fast)) == 0
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Same export bit for bit, same per-matrix report and losses, same step history."""
    wa, wb = (load_file(str(r / "export" / "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = (json.loads((r / "report.json").read_text()) for r in (a, b))
    assert ra["matrices"] == rb["matrices"]
    for key in ("steps", "tokens_seen", "final_loss", "val_loss"):
        assert ra["summary"][key] == rb["summary"][key], key
    timeless = [[{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_time_s")}
                 for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    assert timeless[0] == timeless[1]


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def left_by(point: str, run: Path) -> None:
    """What a kill at `point` leaves in the folder."""
    names = sorted(p.name for p in run.iterdir())
    if point == "prune":
        assert names == ["config.yaml"]
    elif point == "start_write":
        assert names == [".pruned.partial", "config.yaml"]
    elif point == "checkpoint":  # killed writing step 4: step 2 complete, step 4 only as .tmp
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
            [".step_00000004.tmp", "README.md", "latest", "step_00000002"]
    elif point == "step":
        assert check_checkpoint(ckpt(run, 4)) is None and not (run / "export").exists()
    elif point == "export_write":
        assert ".export.partial" in names and "export" not in names and "report.json" not in names
    elif point == "report":
        assert "export" in names and "report.json" not in names


@pytest.mark.parametrize("point, arg, resumes_at", [
    ("prune", None, None), ("start_write", None, None), ("checkpoint", 4, 2), ("step", 5, 4),
    ("export_write", None, 6), ("report", None, 6)])
def test_kill_then_resume_equals_the_uninterrupted_run(reference, fast, tmp_path, capsys, point, arg,
                                                       resumes_at):
    run = tmp_path / "run"
    assert run_killed(point, train_argv(run, *fast), arg) == -9
    left_by(point, run)
    capsys.readouterr()
    assert train.main(train_argv(run, *fast, resume=True)) == 0
    said = capsys.readouterr().out
    if resumes_at is None:
        assert "--resume: no checkpoint in" in said and "starting from step 1" in said
    else:
        assert f"resuming from {ckpt(run, resumes_at)} at step {resumes_at}" in said
    assert_same_run(reference, run)
    assert not [p.name for p in run.rglob(".*partial")] + [p.name for p in run.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def killed_at_step_5(tmp_path_factory, fast) -> Path:
    """A run killed between checkpoints: steps 2 and 4 complete (its copies get damaged)."""
    run = tmp_path_factory.mktemp("killed") / "run"
    assert run_killed("step", train_argv(run, *fast), 5) == -9
    return run


def damage(run: Path, how: str) -> None:
    step4 = ckpt(run, 4)
    if how == "no trainer.json":
        (step4 / "trainer.json").unlink()
    elif how == "truncated rank file":
        f = step4 / "slots-rank00000.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif how == "garbled trainer.json":
        (step4 / "trainer.json").write_text('{"step": 4, "world_')
    elif how == "no checkpoints":
        shutil.rmtree(run / "checkpoints")


@pytest.mark.parametrize("how, reason", [
    ("no trainer.json", "trainer.json is missing"),
    ("truncated rank file", "slots-rank00000.safetensors has 1000 bytes, trainer.json says"),
    ("garbled trainer.json", "trainer.json does not parse"),
    ("no checkpoints", None)])
def test_resume_falls_back_to_the_newest_complete_checkpoint_and_keeps_the_broken_one(
        reference, killed_at_step_5, fast, tmp_path, capsys, how, reason):
    run = tmp_path / "run"
    shutil.copytree(killed_at_step_5, run)
    damage(run, how)
    broken = sorted(p.name for p in ckpt(run, 4).iterdir()) if reason else []
    capsys.readouterr()
    assert train.main(train_argv(run, *fast, resume=True)) == 0
    said = capsys.readouterr().out
    if reason is None:
        assert f"--resume: no checkpoint in {run / 'checkpoints'}; starting from step 1 with the " \
               f"saved starting model {run / 'pruned'}" in said
    else:
        kept = run / "checkpoints" / "step_00000004.unreadable"
        assert f"{ckpt(run, 4)} is not a complete checkpoint ({reason}" in said
        assert f"kept as {kept.name}" in said and f"resuming from {ckpt(run, 2)} at step 2" in said
        assert sorted(p.name for p in kept.iterdir()) == broken  # set aside, not deleted
        assert check_checkpoint(ckpt(run, 4)) is None  # and step 4 written anew
    assert_same_run(reference, run)


def test_resume_of_a_finished_run_changes_nothing(reference, fast, capsys):
    before = {p: p.read_bytes() for p in sorted(reference.rglob("*")) if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    capsys.readouterr()
    assert train.main(train_argv(reference, *fast, resume=True)) == 0
    assert f"--resume: {reference} is finished" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in sorted(reference.rglob("*")) if p.is_file()}
    assert after == before and {p: p.stat().st_mtime_ns for p in after} == stamps
    assert json.loads((reference / "report.json").read_text())["summary"]["final_loss"] is not None


def test_export_refuses_an_incomplete_checkpoint_by_name(killed_at_step_5, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed_at_step_5, run)
    damage(run, "no trainer.json")
    argv = ["--run", str(run), "--checkpoint", str(ckpt(run, 4)), "--out", str(tmp_path / "e")]
    assert export.main(argv) == 2
    assert f"--checkpoint: {ckpt(run, 4)} is not a complete checkpoint (trainer.json is missing)" \
        in capsys.readouterr().err
    assert export.main(argv[:2] + ["--out", str(tmp_path / "e")]) == 0  # the latest complete: step 2
    assert json.loads((tmp_path / "e" / "seft_report.json").read_text())["summary"]["steps"] == 2


def test_a_damaged_starting_model_is_named_on_resume_and_rebuilt_once_removed(
        reference, killed_at_step_5, fast, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(killed_at_step_5, run)
    weights = run / "pruned" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    before = sorted(p.name for p in run.rglob("*"))
    assert train.main(train_argv(run, *fast, resume=True)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume: {weights} is truncated or not a safetensors file"), line
    assert line.endswith(f"remove {run / 'pruned'} and resume again to rebuild it (nothing else of "
                         "the run is lost)")
    assert sorted(p.name for p in run.rglob("*")) == before
    shutil.rmtree(run / "pruned")
    assert train.main(train_argv(run, *fast, resume=True)) == 0  # pruning is deterministic
    assert_same_run(reference, run)
