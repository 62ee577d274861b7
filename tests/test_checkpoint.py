"""Checkpoints (seft_scale/checkpoint.py): written under a temporary name and renamed, `latest`
replaced atomically, the newest N kept; a save killed at any point leaves the previous one."""
import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.checkpoint import (CKPT_DIR, latest_checkpoint, load_trainer_state, rank_file,
                                   save_checkpoint)


def tensors(step: int) -> dict[str, torch.Tensor]:
    return {"m/values": torch.full((3,), float(step)), "m/pos": torch.arange(3) + step}


def steps(out):
    return sorted(p.name for p in (out / CKPT_DIR).iterdir())


def test_save_latest_and_keep(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path, step, tensors(step), {"data_position": step * 4}, keep=2)
        assert path == tmp_path / CKPT_DIR / f"step_{step:08d}"
        assert latest_checkpoint(tmp_path) == path
    assert steps(tmp_path) == ["latest", "step_00000020", "step_00000030"]  # no temporaries left
    assert (tmp_path / CKPT_DIR / "latest").read_text() == "step_00000030"
    state = load_trainer_state(latest_checkpoint(tmp_path))
    files = state.pop("files")  # what check_checkpoint verifies on resume
    assert state == {"data_position": 120, "step": 30, "world_size": 1}
    assert files == {rank_file(0): {"bytes": (path / rank_file(0)).stat().st_size, "tensors": 2}}
    saved = load_file(str(tmp_path / CKPT_DIR / "step_00000030" / rank_file(0)))
    want = tensors(30)
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], v) for k, v in want.items())
    save_checkpoint(tmp_path, 40, tensors(40), {}, keep=1)
    assert steps(tmp_path) == ["latest", "step_00000040"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, tensors(1), {"v": 1})
    save_checkpoint(tmp_path, 5, tensors(2), {"v": 2})
    assert load_trainer_state(latest_checkpoint(tmp_path))["v"] == 2
    assert steps(tmp_path) == ["latest", "step_00000005"]


def test_a_temporary_folder_is_never_used(tmp_path):
    save_checkpoint(tmp_path, 10, tensors(10), {})
    junk = tmp_path / CKPT_DIR / ".step_00000020.tmp"  # a save killed before its rename
    junk.mkdir()
    (junk / "trainer.json").write_text(json.dumps({"step": 20, "world_size": 1}))
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    save_checkpoint(tmp_path, 11, tensors(11), {}, keep=1)  # pruning ignores it too
    assert latest_checkpoint(tmp_path).name == "step_00000011"
    save_checkpoint(tmp_path, 20, tensors(20), {}, keep=1)  # the same step later: written afresh
    assert steps(tmp_path) == ["latest", "step_00000020"]
    assert load_trainer_state(latest_checkpoint(tmp_path)).items() >= {"step": 20, "world_size": 1}.items()


@pytest.mark.parametrize("failing_call", [1, 2])  # the folder's rename, then latest's
def test_a_save_killed_before_a_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    """Killed before the folder's rename: the previous checkpoint; after it (while `latest` was
    written): the new folder is complete, and resume takes the newest complete folder."""
    save_checkpoint(tmp_path, 10, tensors(10), {"v": 10})
    real, calls = os.replace, {"n": 0}

    def dying_replace(a, b):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise KeyboardInterrupt("killed")
        return real(a, b)
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 20, tensors(20), {"v": 20})
    monkeypatch.setattr(os, "replace", real)
    ckpt, want = latest_checkpoint(tmp_path), {1: 10, 2: 20}[failing_call]
    assert ckpt.name == f"step_{want:08d}" and load_trainer_state(ckpt)["v"] == want


def test_a_pointer_to_an_incomplete_folder_is_no_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 10, tensors(10), {})
    os.remove(tmp_path / CKPT_DIR / "step_00000010" / "trainer.json")
    assert latest_checkpoint(tmp_path) is None


def test_every_rank_writes_its_own_file(tmp_path):
    """Three ranks as threads sharing a barrier: one folder, one slot file per rank."""
    world = 3
    barrier = threading.Barrier(world)
    errors = []

    def rank(r):
        try:
            save_checkpoint(tmp_path, 7, {"x": torch.tensor([r])}, {"who": "rank 0"}, rank=r, world=world,
                            barrier=lambda: barrier.wait(timeout=30))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    ckpt = latest_checkpoint(tmp_path)
    files = sorted([rank_file(r) for r in range(world)] + ["trainer.json"])
    assert sorted(p.name for p in ckpt.iterdir()) == files
    assert [int(load_file(str(ckpt / rank_file(r)))["x"]) for r in range(world)] == [0, 1, 2]
    assert load_trainer_state(ckpt).items() >= {"who": "rank 0", "step": 7, "world_size": 3}.items()
