"""What a resume trusts in a checkpoint folder (seft_scale/checkpoint.py), on synthetic files."""
from __future__ import annotations

import json
import threading

import torch

from seft_scale.checkpoint import (check_checkpoint, find_resume_point, rank_file, save_checkpoint,
                                   set_aside, step_dirs)


def write(run, step, world=1, keep=5):
    """Checkpoint `step` written by `world` ranks (threads meeting at a real barrier)."""
    barrier = threading.Barrier(world)
    threads = [threading.Thread(target=save_checkpoint, args=(
        run, step, {"a": torch.arange(4.0) + r, "b": torch.ones(2)}, {"tokens_seen": step}, r, world,
        barrier.wait, keep)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return run / "checkpoints" / f"step_{step:08d}"


def test_trainer_json_lists_every_rank_file_and_a_resume_checks_them(tmp_path):
    ckpt = write(tmp_path, 3, world=2)
    files = json.loads((ckpt / "trainer.json").read_text())["files"]
    assert sorted(files) == [rank_file(0), rank_file(1)] and all(f["tensors"] == 2 for f in files.values())
    assert check_checkpoint(ckpt) is None
    (ckpt / rank_file(1)).unlink()
    assert check_checkpoint(ckpt) == f"{rank_file(1)} is missing"


def test_a_rank_file_that_opens_but_is_not_the_one_recorded_is_refused(tmp_path):
    from safetensors.torch import save_file
    ckpt = write(tmp_path, 1)
    recorded = (ckpt / rank_file(0)).stat().st_size
    save_file({"a": torch.arange(6.0)}, str(ckpt / rank_file(0)))  # complete, but another file
    now = (ckpt / rank_file(0)).stat().st_size
    assert check_checkpoint(ckpt) == f"{rank_file(0)} has {now} bytes, trainer.json says {recorded}"


def test_a_checkpoint_written_before_the_file_list_is_still_trusted_when_its_files_open(tmp_path):
    ckpt = write(tmp_path, 2)
    state = json.loads((ckpt / "trainer.json").read_text())
    del state["files"]
    (ckpt / "trainer.json").write_text(json.dumps(state))
    assert check_checkpoint(ckpt) is None
    (ckpt / rank_file(0)).write_bytes(b"\x08\x00")
    assert check_checkpoint(ckpt).startswith(f"{rank_file(0)} does not open")


def test_the_resume_point_skips_broken_newer_ones_and_set_aside_keeps_them(tmp_path):
    for step in (2, 4, 6):
        write(tmp_path, step)
    (tmp_path / "checkpoints" / "step_00000006" / "trainer.json").write_text("{")
    (tmp_path / "checkpoints" / "step_00000004" / "trainer.json").write_text("[]")
    point = find_resume_point(tmp_path)
    assert point.checkpoint.name == "step_00000002"
    assert [(c.name, r.split(" (")[0]) for c, r in point.unreadable] == [
        ("step_00000006", "trainer.json does not parse"),
        ("step_00000004", "trainer.json names no step and world_size")]
    kept = [set_aside(c) for c, _ in point.unreadable]
    (tmp_path / "checkpoints" / "step_00000006").mkdir()
    assert set_aside(tmp_path / "checkpoints" / "step_00000006").name == "step_00000006.unreadable-1"
    assert [k.name for k in kept] == ["step_00000006.unreadable", "step_00000004.unreadable"]
    assert all((k / rank_file(0)).is_file() for k in kept)
    assert [c.name for c in step_dirs(tmp_path)] == ["step_00000002"]


def test_the_keep_policy_removes_only_old_complete_names_and_leaves_no_half_removed_folder(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["latest", "step_00000003", "step_00000004"]
