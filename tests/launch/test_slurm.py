"""launch/slurm/*.sbatch + launch.py in a faked Slurm job: SLURM_* variables set here, a fake
`scontrol` (and, for the real submit path, fake `srun` and torchrun) on PATH. Checks the exact
per-node torchrun commands at 1 and 4 nodes, the path through srun, and the named errors."""
import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCONTROL = """#!/bin/sh
# scontrol show hostnames LIST: the hosts of a job, one per line (only what launch.py asks)
[ "$1 $2" = "show hostnames" ] || exit 1
case "$3" in
  "gpu[001-004]") printf 'gpu001\\ngpu002\\ngpu003\\ngpu004\\n' ;;
  *) echo "$3" | tr ',' '\\n' ;;
esac
"""
# srun --ntasks-per-node=1 CMD...: run CMD once per node with that node's SLURM_NODEID
SRUN = """#!/bin/sh
while [ "${1#--}" != "$1" ]; do echo "$1" >> "$SRUN_LOG"; shift; done
i=0
while [ $i -lt "$SLURM_NNODES" ]; do SLURM_NODEID=$i "$@" || exit $?; i=$((i+1)); done
"""
TORCHRUN = """#!/bin/sh
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $*" >> "$TORCHRUN_LOG"
"""


@pytest.fixture
def slurm(tmp_path):
    """A fake Slurm job's environment (4 nodes unless a test changes it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("scontrol", SCONTROL), ("srun", SRUN), ("fake-torchrun", TORCHRUN)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SEFT_"))}
    env.update(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{env['PATH']}",
               SLURM_JOB_ID="4242", SLURM_NNODES="4", SLURM_JOB_NODELIST="gpu[001-004]",
               SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64", SLURM_SUBMIT_DIR=str(ROOT),
               SEFT_PYTHON=sys.executable, SRUN_LOG=str(tmp_path / "srun.log"),
               TORCHRUN_LOG=str(tmp_path / "torchrun.log"))
    return env


def sbatch(script, env, *args):
    return subprocess.run(["bash", str(ROOT / "launch" / "slurm" / script), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def node_lines(stdout):
    """{node rank: argv} from the dry run's '[node R HOST] ENV... CMD' lines."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("[node "):
            head, cmd = line.split("] ", 1)
            out[int(head.split()[1])] = (head.split()[2], shlex.split(cmd))
    return out


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_dry_run_four_nodes_zero3(slurm):
    res = sbatch("train_zero3.sbatch", {**slurm, "SEFT_DRY_RUN": "1"}, "configs/runs/tiny.yaml",
                 "train.steps=5")
    assert res.returncode == 0, res.stderr
    nodes = node_lines(res.stdout)
    assert sorted(nodes) == [0, 1, 2, 3]
    for rank, (host, argv) in nodes.items():
        assert host == f"gpu00{rank + 1}"
        assert argv[0] == "OMP_NUM_THREADS=8"  # 64 cpus per task / 8 ranks
        assert argv[1:4] == [sys.executable, "-m", "torch.distributed.run"]
        assert (flag(argv, "--nnodes"), flag(argv, "--node_rank"), flag(argv, "--nproc_per_node"),
                flag(argv, "--master_addr"), flag(argv, "--master_port")) == \
            ("4", str(rank), "8", "gpu001", str(15000 + 4242))
        train = argv[argv.index("launch/train.py"):]
        assert train == ["launch/train.py", "--ds_config", "configs/ds/zero3.json", "--config",
                         "configs/runs/tiny.yaml", "--output-dir", "out/tiny-4242", "train.steps=5"]


def test_dry_run_one_node_fsdp_from_gpus_per_node(slurm):
    env = {**slurm, "SEFT_DRY_RUN": "1", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "cn17",
           "SLURM_GPUS_PER_NODE": "h100:4", "SLURM_CPUS_PER_TASK": "", "SLURM_CPUS_ON_NODE": "32",
           "SLURM_JOB_ID": "123456", "SEFT_OUTPUT_DIR": "/scratch/run1"}
    del env["SLURM_GPUS_ON_NODE"]
    res = sbatch("train_fsdp.sbatch", env, "configs/runs/tiny.yaml")
    assert res.returncode == 0, res.stderr
    (host, argv), = node_lines(res.stdout).values()
    assert host == "cn17" and argv[0] == "OMP_NUM_THREADS=8"
    assert (flag(argv, "--nnodes"), flag(argv, "--node_rank"), flag(argv, "--nproc_per_node"),
            flag(argv, "--master_addr"), flag(argv, "--master_port")) == \
        ("1", "0", "4", "cn17", str(15000 + 123456 % 20000))
    assert argv[argv.index("launch/train.py"):] == [
        "launch/train.py", "--backend", "fsdp", "--config", "configs/runs/tiny.yaml",
        "--output-dir", "/scratch/run1"]


def test_submit_path_runs_srun_then_torchrun_on_every_node(slurm, tmp_path):
    """Without dry run: the script execs srun (one task per node); each task's launch.py execs
    torchrun with its node rank. A requeued job (SLURM_RESTART_COUNT) resumes."""
    env = {**slurm, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "a1,a2", "SLURM_RESTART_COUNT": "1",
           "SEFT_TORCHRUN": str(tmp_path / "bin" / "fake-torchrun")}
    res = sbatch("train_fsdp.sbatch", env, "configs/runs/tiny.yaml")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "srun.log").read_text().split() == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64"]
    calls = [shlex.split(x) for x in (tmp_path / "torchrun.log").read_text().splitlines()]
    assert [flag(c, "--node_rank") for c in calls] == ["0", "1"]
    for c in calls:
        assert c[0] == "OMP_NUM_THREADS=8" and flag(c, "--master_addr") == "a1"
        assert c[-2:] == ["out/tiny-4242", "--resume"]


def test_dry_run_outside_slurm_uses_the_sbatch_lines(slurm):
    env = {k: v for k, v in slurm.items() if not k.startswith("SLURM_")}
    res = sbatch("train_zero3.sbatch", {**env, "SEFT_DRY_RUN": "1"}, "configs/runs/tiny.yaml")
    assert res.returncode == 0, res.stderr
    assert "placeholders" in res.stdout
    nodes = node_lines(res.stdout)
    assert sorted(nodes) == [0, 1, 2, 3]  # #SBATCH --nodes=4
    assert all(flag(argv, "--nproc_per_node") == "8" and flag(argv, "--master_addr") == "<node0>"
               for _, argv in nodes.values())


@pytest.mark.parametrize("change,args,message", [
    ({"SLURM_JOB_ID": None}, ["configs/runs/tiny.yaml"], "not inside a Slurm job"),
    ({"SEFT_DRY_RUN": "1", "SLURM_SUBMIT_DIR": "/"}, ["configs/runs/tiny.yaml"],
     "is not the seft_scale repository"),
    ({}, [], "usage: sbatch"),
])
def test_script_errors_are_named(slurm, change, args, message):
    env = dict(slurm)
    for k, v in change.items():
        env.pop(k) if v is None else env.__setitem__(k, v)
    res = sbatch("train_zero3.sbatch", env, *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def launch_main(monkeypatch, env, *argv):
    """launch/slurm/launch.py's main in this process (no interpreter start per case)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("slurm_launch", ROOT / "launch" / "slurm" / "launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for k in [k for k in os.environ if k.startswith(("SLURM_", "SEFT_"))]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(os, "execvp", lambda *a: pytest.fail(f"exec {a}"))
    return mod.main(list(argv))


@pytest.mark.parametrize("change,args,message", [
    ({}, ["configs/runs/nope.yaml"], "configs/runs/nope.yaml does not exist"),
    ({}, ["configs/runs/tiny.yaml", "seft.lora_rank=-1"], "seft.lora_rank: must be > 0"),
    ({"SEFT_DS_CONFIG": "configs/ds/none.json"}, ["configs/runs/tiny.yaml"],
     "configs/ds/none.json does not exist"),
    ({"SLURM_NNODES": "3"}, ["configs/runs/tiny.yaml"], "has 4 hosts, SLURM_NNODES says 3"),
    ({"SLURM_GPUS_ON_NODE": "many"}, ["configs/runs/tiny.yaml"], "expected a count"),
    ({"SEFT_DRY_RUN": "0"}, ["configs/runs/tiny.yaml"], "SLURM_NODEID is not set"),
])
def test_launcher_errors_are_named(slurm, monkeypatch, capsys, change, args, message):
    env = {k: v for k, v in {**slurm, "SEFT_DRY_RUN": "1", **change}.items()}
    assert launch_main(monkeypatch, env, "--backend", "zero3", *args) == 2
    assert message in capsys.readouterr().err
