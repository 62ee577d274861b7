"""The DeepSpeed ZeRO-3 backend on 1-3 gloo ranks (forked workers, tests/distributed/harness.py):
* the ds config is validated against the run config before any heavy work;
* topology updates through the real backend pick the same positions bit for bit at 1, 2 and 3
  ranks (uneven shards, ZeRO padding), with persistent (resident) weights and with param offload,
  exact budgets on every rank after every update, and the window G reduce-scattered equal to 1 rank;
* a 2-rank run matches a 1-rank run with the same global batch (losses, supports), and each rank
  holds about half the SEFT state;
* kill + resume equals the uninterrupted run; a 2-rank checkpoint reloads at 1 and 3 ranks with the
  same export;
* DeepSpeed's zero_to_fp32.py refuses the checkpoint folder, whose README says how to get the
  weights, and that way works;
* a rank that reaches train() late does not find rank 0's files in a new output folder;
* bf16 weights from the ds config train and export with exact budgets;
* a dead rank makes the other exit with a clear error, not hang;
* one real `deepspeed --num_gpus 2` launch writes export/ and report.json with exact budgets."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.config import load_config
from seft_scale.errors import ConfigError
from tests.conftest import ROOT
from tests.distributed import harness
from tests.distributed.harness import free_port, run_world
from tests.distributed.zero3_workers import TINY, ds_config, run, topology

RUN = ["train.steps=12", "seft.update_interval=4", "seft.window=2", "train.check_invariants=true",
       "train.eval_batches=2", "train.checkpoint_every=3", "train.keep_checkpoints=4",
       "train.micro_batch_size=4", "data.seq_len=64"]
PARTITIONED = ds_config(stage3_param_persistence_threshold=0)  # every target gathered per use


def _weights(run_dir):
    return load_file(str(run_dir / "export" / "model.safetensors"))


def _metrics(run_dir):
    return [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_time_s")}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """The reference: 2 ranks, the shipped configs/ds/zero3.json (the tiny model's targets are
    under its persistence threshold, so they stay resident after the first step)."""
    out = tmp_path_factory.mktemp("zero3") / "run2"
    res = run_world(run, 2, out, RUN, ds_config())
    return out, res


def test_ds_config_is_checked_against_the_run_before_any_work():
    from seft_scale.backends.zero3 import Zero3Backend, load_ds_config
    cfg = load_config(TINY, ["train.grad_accum=2", "train.max_grad_norm=0.5"])
    ds = load_ds_config(ds_config(), cfg, world=3)
    assert (ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"],
            ds["train_batch_size"], ds["gradient_clipping"], ds["bf16"]["enabled"]) == (2, 8, 48, 0.5, False)
    bad = [({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 conflicts with train.grad_accum=2"),
           ({"gradient_clipping": 1.0}, "gradient_clipping=1.0 conflicts with train.max_grad_norm=0.5"),
           ({"train_batch_size": 16}, "train_batch_size=16 conflicts"),
           ({"bf16": {"enabled": True}}, "bf16.enabled=True conflicts with model.dtype='auto'"),
           ({"fp16": {"enabled": True}}, "fp16.enabled"),
           ({"optimizer": {"type": "AdamW"}}, "optimizer: θ is frozen"),
           ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage"),
           ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
           ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload_param.device")]
    for change, msg in bad:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_ds_config({**ds_config(), **change}, cfg, world=3)
    with pytest.raises(ConfigError, match="--ds_config: /nonexistent.json does not exist"):
        Zero3Backend(cfg, "/nonexistent.json")  # before any process group or model
    with pytest.raises(ConfigError, match="eval: in-run evaluation"):
        Zero3Backend(load_config(TINY, ["eval.tasks=[piqa]"]))


def test_topology_updates_pick_the_same_positions_at_1_2_3_ranks(run2):
    model_dir = run2[0] / "pruned"
    worlds = [(1, PARTITIONED), (2, ds_config()), (2, ds_config("zero3_offload.json")),
              (3, PARTITIONED)]
    results = []
    for world, ds in worlds:
        ranks = run_world(topology, world, model_dir, ds)
        merged = {"loss": [r["loss"] for r in ranks], "updates": [], "G": {}}
        for name in ranks[0]["G"]:
            spans = [r["offsets"][name] for r in ranks]
            assert spans[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
            merged["G"][name] = torch.cat([torch.from_numpy(r["G"][name]) for r in ranks])
        for u in range(3):
            merged["updates"].append({})
            for name in ranks[0]["updates"][u]:
                per_rank = [r["updates"][u][name] for r in ranks]
                merged["updates"][u][name] = tuple(torch.cat([torch.from_numpy(p[i]) for p in per_rank])
                                                   for i in (0, 1))
                assert sum(p[3] for p in per_rank) > 0  # slots exist (budget checked on the ranks)
        assert all(r["partition_device"] == {"cpu"} for r in ranks)
        assert all(r["gathered_after_backward"] == [] for r in ranks)
        results.append(merged)
    ref = results[0]
    for (world, _), got in zip(worlds[1:], results[1:]):
        assert len(set(got["loss"])) == 1  # every rank computed the same loss
        assert abs(got["loss"][0] - ref["loss"][0]) < 1e-5, (world, got["loss"], ref["loss"])
        for name, g in ref["G"].items():
            assert torch.allclose(got["G"][name], g, rtol=1e-5, atol=1e-8), name
        for u in range(3):
            for name, (pos, mask) in ref["updates"][u].items():
                assert torch.equal(got["updates"][u][name][0], pos), (world, u, name)
                assert torch.equal(got["updates"][u][name][1], mask), (world, u, name)


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    # dense window scores: 1 rank accumulates the 2 micro-batches that 2 ranks run one each, and
    # candidates are chosen from a window's first micro-batch (seft/window.py); with dense scores
    # both see the same summed gradients, so their topologies agree bit for bit
    dense = RUN + ["seft.window_scores=dense"]
    out2 = tmp_path / "run2"
    res2 = run_world(run, 2, out2, dense, ds_config())
    res1 = run_world(run, 1, tmp_path / "run1", dense + ["train.grad_accum=2"], PARTITIONED)
    m1, m2 = _metrics(tmp_path / "run1"), _metrics(out2)
    assert [r["step"] for r in m2] == list(range(1, 13))
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
        assert (a["grown"], a["adapt_pruned"]) == (b["grown"], b["adapt_pruned"])
    assert sum(r["grown"] for r in m2) > 0
    w1, w2 = _weights(tmp_path / "run1"), _weights(out2)
    report = json.loads((out2 / "report.json").read_text())
    for name, m in report["matrices"].items():
        s1, s2 = w1[name + ".weight"] != 0, w2[name + ".weight"] != 0
        assert int((s1 & s2).sum()) >= 0.99 * int(s1.sum()), name
        assert m["support"] == m["budget"] == int(s2.sum())
    assert report["summary"]["sparsity"]["exact_budget"]
    # no replicated full-size state: the 2 ranks' SEFT state adds up to 1 rank's, split ~evenly
    one, two = res1[0]["state_bytes"], [r["state_bytes"] for r in res2]
    assert sum(two) == one and max(two) < 0.55 * one, (one, two)
    assert sum(r["partition_numel"] for r in res2) == res1[0]["partition_numel"]


def test_kill_and_resume_equals_the_uninterrupted_run(run2, tmp_path):
    out2, _ = run2
    out = tmp_path / "b"
    crashed = run_world(run, 2, out, RUN, ds_config(), 5)  # in step 5, after the step-3 checkpoint
    assert all(r["error"] == "RuntimeError: simulated crash" for r in crashed)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    run_world(run, 2, out, RUN, ds_config(), None, True)
    wa, wb = _weights(out2), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for rank in range(2):
        f = f"checkpoints/step_00000012/slots-rank{rank:05d}.safetensors"
        sa, sb = load_file(str(out2 / f)), load_file(str(out / f))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _metrics(out2) == _metrics(out)


def test_a_two_rank_checkpoint_reloads_at_1_and_3_ranks_with_the_same_export(run2, tmp_path):
    out2, _ = run2
    ref = _weights(out2)
    for world in (1, 3):
        out = tmp_path / f"w{world}"
        shutil.copytree(out2, out, ignore=shutil.ignore_patterns("export", "report.json"))
        run_world(run, world, out, RUN, PARTITIONED, None, True)
        got = _weights(out)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), world
        assert json.loads((out / "report.json").read_text())["matrices"] == \
            json.loads((out2 / "report.json").read_text())["matrices"]


def test_zero_to_fp32_refuses_and_the_folder_says_how_to_get_the_weights(run2, tmp_path):
    out2, _ = run2
    ckpts = out2 / "checkpoints"
    for target in (ckpts, ckpts / "step_00000012"):
        res = subprocess.run([sys.executable, "-m", "deepspeed.utils.zero_to_fp32", str(target),
                              str(tmp_path / "fp32")], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert res.returncode != 0 and ("can't find" in res.stderr or "Unable to find" in res.stderr)
        assert not (tmp_path / "fp32").exists()  # nothing written, so nothing silently wrong
    readme = (ckpts / "README.md").read_text()
    assert "zero_to_fp32.py" in readme and "seft-export --run <run>" in readme
    # ... and what it says works: one process, from the 2-rank checkpoint
    run_copy = tmp_path / "run"
    shutil.copytree(out2, run_copy, ignore=shutil.ignore_patterns("export", "report.json"))
    res = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), "--run", str(run_copy)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    ref, got = _weights(out2), _weights(run_copy)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_rank_arriving_late_still_finds_the_output_folder_empty(tmp_path):
    # without a barrier after the output check, rank 1 would see rank 0's config.yaml: "not empty"
    res = run_world(run, 2, tmp_path / "late", ["train.steps=1", "train.eval_batches=0"],
                    PARTITIONED, None, False, None, 2.0)
    assert res[0]["summary"]["sparsity"]["exact_budget"] and "error" not in res[1]


def test_bf16_from_the_ds_config(tmp_path):
    ds = {**ds_config(), "bf16": {"enabled": True}}
    res = run_world(run, 2, tmp_path / "bf16", ["model.dtype=bfloat16", "train.steps=2",
                    "seft.update_interval=1", "seft.window=1", "train.check_invariants=true",
                    "train.eval_batches=0", "train.micro_batch_size=2", "data.seq_len=64"], ds)
    assert res[0]["summary"]["sparsity"]["exact_budget"]
    weights = _weights(tmp_path / "bf16")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())["matrices"]
    assert all(int((weights[n + ".weight"] != 0).sum()) == m["budget"] for n, m in report.items())


def test_a_dead_rank_makes_the_other_exit_with_a_clear_error(tmp_path):
    timeout_s = 20
    args = (tmp_path / "dead", RUN, PARTITIONED, None, False, 3)  # rank 1 exits in step 3
    t0 = time.perf_counter()
    procs, results = harness.start_world(run, 2, *args, timeout_s=timeout_s)
    try:
        rank, status, value = results.get(timeout=timeout_s + 60)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert (rank, status) == (0, "ok") and procs[1].exitcode == 3
    assert value["error"].startswith("PeerFailure: rank 0: a collective failed during"), value
    assert "another rank probably died" in value["error"]
    assert value["elapsed_s"] < timeout_s and time.perf_counter() - t0 < timeout_s + 30


def test_real_deepspeed_launcher_end_to_end(tmp_path):
    out = tmp_path / "launched"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the backend sets it
    env.update(DS_ACCELERATOR="cpu", SEFT_DIST_TIMEOUT="120")
    # the launcher of the environment running the tests (a worktree has no .venv of its own)
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, f"no deepspeed launcher beside {sys.executable} or on PATH"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "train.py"), "--deepspeed_config", str(ROOT / "configs" / "ds" / "zero3.json"),
           "--config", TINY, "--output-dir", str(out), "--no-progress",
           # no held-out pass: export follows the last backward (ZeRO must have released its weights)
           "train.steps=6", "seft.update_interval=3", "seft.window=1", "train.eval_batches=0",
           "train.micro_batch_size=4", "data.seq_len=64"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "zero3: OMP_NUM_THREADS was unset; using" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["sparsity"]["exact_budget"] and report["summary"]["steps"] == 6
    assert all(m["nnz"] == m["budget"] == m["support"] for m in report["matrices"].values())
    weights = _weights(out)
    for name, m in report["matrices"].items():
        assert int((weights[name + ".weight"] != 0).sum()) == m["nnz"]
    assert (out / "export" / "config.json").is_file()
