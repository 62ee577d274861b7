#!/usr/bin/env python
"""The per-node command of a multi-node SEFT run under Slurm: what train_zero3.sbatch and
train_fsdp.sbatch run on every node (one Slurm task per node).

    srun --ntasks-per-node=1 python launch/slurm/launch.py --backend zero3 RUN.yaml [key=value ...]
    python launch/slurm/launch.py --dry-run --backend fsdp RUN.yaml     # print every node's command

Every node execs torchrun with a static rendezvous built from the job's variables: --nnodes
$SLURM_NNODES, --node_rank $SLURM_NODEID, --master_addr = the first host of $SLURM_JOB_NODELIST
(`scontrol show hostnames`), --master_port = 15000 + $SLURM_JOB_ID mod 20000 (two jobs sharing a
node get different ports), --nproc_per_node = GPUs on the node. torchrun rather than DeepSpeed's
launcher for both backends: the zero3 backend takes its ranks from torchrun's environment like
FSDP does, so one rendezvous serves both, with no hostfile, no ssh between nodes, and torchrun's
agent tears the node down when a rank dies.

Environment (all optional):
  SEFT_OUTPUT_DIR       run folder (default out/<config name>-<job id>)
  SEFT_DS_CONFIG        DeepSpeed JSON for zero3 (default configs/ds/zero3.json)
  SEFT_NPROC_PER_NODE   ranks per node (default $SLURM_GPUS_ON_NODE, else $SLURM_GPUS_PER_NODE, else 1)
  SEFT_MASTER_PORT      rendezvous port (default from the job id)
  SEFT_RESUME=1         pass --resume (automatic when Slurm requeued the job: $SLURM_RESTART_COUNT > 0)
  SEFT_TORCHRUN         how to start torchrun (default: this python -m torch.distributed.run), e.g.
                        "apptainer exec --nv image.sif torchrun"
  SEFT_DRY_RUN=1        same as --dry-run
OMP_NUM_THREADS is set to the task's CPUs / ranks per node ($SLURM_CPUS_PER_TASK, else
$SLURM_CPUS_ON_NODE, else this machine's cores).

Outside a Slurm job only --dry-run works: it reads --nodes, --gpus-per-node and --cpus-per-task
from the #SBATCH lines of --sbatch-script and shows placeholder host names.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class LaunchError(RuntimeError):
    """The job cannot start; the message says why and what to set."""


def _int_env(env: dict, key: str) -> int | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    m = re.search(r"(\d+)(?:\(x\d+\))?$", value)  # "8", "h100:8", "gpu:a100:4", "64(x2)"
    if not m:
        raise LaunchError(f"{key}={value!r}: expected a count")
    return int(m.group(1))


def sbatch_defaults(script: Path) -> dict:
    """--nodes / --gpus-per-node / --cpus-per-task of a script's #SBATCH lines, as Slurm would
    export them (for a dry run outside any job)."""
    env = {"SLURM_JOB_ID": "0", "SLURM_NNODES": "1"}
    keys = {"nodes": "SLURM_NNODES", "N": "SLURM_NNODES", "gpus-per-node": "SLURM_GPUS_PER_NODE",
            "cpus-per-task": "SLURM_CPUS_PER_TASK", "c": "SLURM_CPUS_PER_TASK"}
    for line in script.read_text().splitlines():
        m = re.match(r"#SBATCH\s+--?([\w-]+)[= ]\s*(\S+)", line)
        if m and m.group(1) in keys:
            env[keys[m.group(1)]] = m.group(2)
    n = int(env["SLURM_NNODES"])
    env["SLURM_JOB_NODELIST"] = ",".join(f"<node{i}>" for i in range(n))
    return env


def hostnames(nodelist: str, placeholder: bool) -> list[str]:
    if placeholder:
        return nodelist.split(",")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True).stdout.split()
    except FileNotFoundError:
        raise LaunchError("scontrol is not on PATH: run inside a Slurm job") from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"scontrol show hostnames {nodelist}: {e.stderr.strip()}") from None
    if not out:
        raise LaunchError(f"scontrol show hostnames {nodelist} returned no host")
    return out


def check_run(backend: str, config: str, overrides: list[str], env: dict) -> str | None:
    """Fail before the job spends GPU time: the run config and its overrides must validate, and
    zero3 needs its DeepSpeed JSON. Returns the ds config path (zero3)."""
    from seft_scale.config import ConfigError, load_config
    if not Path(config).is_file():
        raise LaunchError(f"run config {config} does not exist (paths are relative to {Path.cwd()})")
    try:
        load_config(config, overrides)
    except ConfigError as e:
        raise LaunchError(f"{config}: {e}") from None
    if backend != "zero3":
        return None
    ds = env.get("SEFT_DS_CONFIG") or "configs/ds/zero3.json"
    if not Path(ds).is_file():
        raise LaunchError(f"DeepSpeed config {ds} does not exist (set SEFT_DS_CONFIG)")
    return ds


def node_commands(backend: str, config: str, overrides: list[str], env: dict,
                  placeholder_hosts: bool = False) -> list[tuple[str, dict, list[str]]]:
    """(host, extra environment, argv) of every node, in node-rank order."""
    if not env.get("SLURM_JOB_ID"):
        raise LaunchError("not inside a Slurm job (no SLURM_JOB_ID): submit with sbatch, or "
                          "preview with SEFT_DRY_RUN=1")
    for key in ("SLURM_NNODES", "SLURM_JOB_NODELIST"):
        if not env.get(key):
            raise LaunchError(f"{key} is not set: is this a Slurm job step?")
    nnodes = _int_env(env, "SLURM_NNODES")
    hosts = hostnames(env["SLURM_JOB_NODELIST"], placeholder_hosts)
    if len(hosts) != nnodes:
        raise LaunchError(f"SLURM_JOB_NODELIST has {len(hosts)} hosts, SLURM_NNODES says {nnodes}")
    nproc = next((n for n in (_int_env(env, k) for k in (
        "SEFT_NPROC_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")) if n), None)
    if nproc is None:
        print("launch: no GPU count from Slurm (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE); one "
              "rank per node. Set SEFT_NPROC_PER_NODE or #SBATCH --gpus-per-node", file=sys.stderr)
        nproc = 1
    cpus = _int_env(env, "SLURM_CPUS_PER_TASK") or _int_env(env, "SLURM_CPUS_ON_NODE") \
        or os.cpu_count() or 1
    job = int(env["SLURM_JOB_ID"])
    port = _int_env(env, "SEFT_MASTER_PORT") or 15000 + job % 20000
    ds = check_run(backend, config, overrides, env)
    out_dir = env.get("SEFT_OUTPUT_DIR") or f"out/{Path(config).stem}-{job}"
    resume = env.get("SEFT_RESUME", "0") not in ("", "0") or (_int_env(env, "SLURM_RESTART_COUNT") or 0) > 0
    torchrun = shlex.split(env.get("SEFT_TORCHRUN") or f"{sys.executable} -m torch.distributed.run")
    train = (["--ds_config", ds] if backend == "zero3" else ["--backend", "fsdp"]) + \
        ["--config", config, "--output-dir", out_dir] + (["--resume"] if resume else []) + overrides
    return [(host, {"OMP_NUM_THREADS": str(max(1, cpus // nproc))},
             torchrun + ["--nnodes", str(nnodes), "--node_rank", str(rank), "--nproc_per_node",
                         str(nproc), "--master_addr", hosts[0], "--master_port", str(port),
                         "launch/train.py"] + train)
            for rank, host in enumerate(hosts)]


def render(env: dict, argv: list[str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["zero3", "fsdp"], required=True)
    ap.add_argument("--dry-run", action="store_true", help="print every node's command, run nothing")
    ap.add_argument("--sbatch-script", default=None,
                    help="the calling sbatch script (its #SBATCH lines shape a dry run outside Slurm)")
    ap.add_argument("config", help="run config YAML (configs/runs/...)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    env = dict(os.environ)
    dry = args.dry_run or env.get("SEFT_DRY_RUN", "0") not in ("", "0")
    try:
        placeholder = dry and not env.get("SLURM_JOB_ID")
        if placeholder:
            if not args.sbatch_script:
                raise LaunchError("not inside a Slurm job: a dry run here needs --sbatch-script")
            env.update(sbatch_defaults(Path(args.sbatch_script)))
        nodes = node_commands(args.backend, args.config, args.overrides, env, placeholder)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if dry:
        if placeholder:
            print(f"# not inside a Slurm job: nodes and GPUs from the #SBATCH lines of "
                  f"{args.sbatch_script}; host names and job id 0 are placeholders")
        for rank, (host, extra, cmd) in enumerate(nodes):
            print(f"[node {rank} {host}] {render(extra, cmd)}")
        return 0
    rank = _int_env(env, "SLURM_NODEID")
    if rank is None or rank >= len(nodes):
        print("error: SLURM_NODEID is not set or out of range: start this through srun, one task "
              "per node (the sbatch scripts do)", file=sys.stderr)
        return 2
    host, extra, cmd = nodes[rank]
    print(f"[node {rank} {host}] {render(extra, cmd)}", flush=True)
    os.environ.update(extra)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
