"""Compare repair methods on one pruned model (behind launch/compare.py).

The starting model is built and pruned once, by the run config's model and prune sections, the
way a run builds it (run.build_start), into DIR/pruned. Each method then runs as its own
`python -m seft_scale.cli.train --start-model DIR/pruned` process into DIR/<method>:
the same starting weights, data, steps and batch (so the same tokens), and for lora_star, sqft and
seft the same trainable budget (LoRA rank r <-> SEFT K = r·(d_in + d_out), methods.trainable_count;
static trains every nonzero of the targets). Only the learning rate is per method (DEFAULT_LRS).

Measured per method, and how:
- held-out perplexity: eval.ppl_data by the Wanda protocol on each run's repaired model when the
  config has it (method none's is the pruned model's), else exp of the run's held-out loss;
- exact sparsity and budget: the run's report.json;
- wall time: the parent's clock from spawning the run's process to reaping it (Python start, model
  load, data, training, evaluation, export); the training loop alone is the run's train_time_s;
- peak memory: ru_maxrss of the run's process as os.wait4 returns it, its peak resident set: the
  model, optimizer state and activations *and* the Python / torch runtime (~0.5 GB on its own).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from seft_scale.backends.local import LocalBackend
from seft_scale.config import RunConfig, load_config
from seft_scale.data import tokenizer_training_text
from seft_scale.errors import ConfigError
from seft_scale.evaluate import folder_matrices
from seft_scale.methods import trainable_count
from seft_scale.run import build_start as build_run_start

METHODS = typing.get_args(typing.get_type_hints(RunConfig)["method"])
DEFAULT_METHODS = ("none", "static", "lora_star", "sqft", "seft")
# Peak learning rate per method when --lr does not name it. static moves the weights themselves, as
# full fine-tuning does, so it needs the smallest; LoRA's update is scaled by alpha/r (2e-4..1e-3
# is usual); SEFT's δ is a free per-position offset (~1e-3 in the paper), and the run configs'
# train.lr is tuned for it, so seft keeps the config's train.lr (None).
DEFAULT_LRS: dict[str, Optional[float]] = {"static": 5e-5, "lora_star": 5e-4, "sqft": 5e-4, "seft": None}
TRAIN = [sys.executable, "-m", "seft_scale.cli.train"]
MiB = 1 << 20


@dataclass
class MethodRun:
    method: str
    lr: Optional[float]  # None for method none (it trains nothing)
    overrides: list[str]  # the user's overrides + what this method sets
    cfg: RunConfig
    trainable: int = 0


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ConfigError(f"--methods: unknown method(s) {unknown or [text]}; choose from "
                          f"{', '.join(DEFAULT_METHODS)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise ConfigError(f"--methods: {', '.join(twice)} named more than once")
    return names


def parse_lrs(text: Optional[str]) -> dict[str, float]:
    """'seft=2e-3,static=5e-5' -> {method: lr}; only methods that train take a learning rate."""
    lrs: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise ConfigError(f"--lr: {item!r} is not method=value (e.g. seft=2e-3,static=5e-5)")
        if name not in DEFAULT_LRS:
            raise ConfigError(f"--lr: {name!r} takes no learning rate; methods that train: "
                              f"{', '.join(DEFAULT_LRS)}")
        try:
            lr = float(value)
        except ValueError:
            raise ConfigError(f"--lr: {value!r} (for {name}) is not a number") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"--lr: {name}={value} must be a finite number > 0")
        if name in lrs:
            raise ConfigError(f"--lr: {name} given more than once")
        lrs[name] = lr
    return lrs


def plan_runs(config: str, methods: list[str], lrs: dict[str, float],
              overrides: list[str]) -> tuple[RunConfig, list[MethodRun]]:
    """The base config and each method's validated config, before anything is written."""
    for item in overrides:
        if item.split("=", 1)[0].strip() == "method":
            raise ConfigError(f"override {item!r}: compare sets each run's method; use --methods")
    base = load_config(config, overrides)
    if not base.eval.ppl_data and not base.train.eval_batches:
        raise ConfigError("eval.ppl_data / train.eval_batches: a comparison needs a held-out measure; "
                          "set eval.ppl_data (perplexity) or train.eval_batches > 0 (held-out loss)")
    runs = []
    for m in methods:
        lr = None if m == "none" else lrs.get(m) or DEFAULT_LRS[m] or base.train.lr
        extra = [f"method={m}"] + ([f"train.lr={lr!r}"] if lr is not None else [])
        if base.eval.ppl_data:  # one perplexity per run: its result (none's result is the pruned model)
            extra.append("eval.stages=[repaired]")
        runs.append(MethodRun(m, lr, list(overrides) + extra, load_config(config, list(overrides) + extra)))
    return base, runs


def check_output_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--output-dir: {out} exists and is not an empty folder; choose a new one "
                          "(a comparison never overwrites)")


def build_start(cfg: RunConfig, out: Path) -> dict:
    """The starting model of every method: built and pruned the way a run builds it, saved as
    out/pruned; or the config's model.path itself when it comes pruned (prune.method none)."""
    if cfg.prune.method == "none" and cfg.model.path:
        return {"path": cfg.model.path, "pruned_by": "none (model.path comes pruned)"}
    t0, evals = time.perf_counter(), {}
    build_run_start(cfg, LocalBackend(), out / "pruned", tokenizer_training_text(cfg.data), evals)
    dense = evals.get("dense")  # None unless eval.stages asks for it
    return {"path": str(out / "pruned"), "pruned_by": f"{cfg.prune.method} {cfg.prune.pattern} "
            f"sparsity {cfg.prune.sparsity}", "time_s": round(time.perf_counter() - t0, 3),
            "dense_ppl": dense["perplexity"]["ppl"] if dense and "perplexity" in dense else None}


def folder_sha256(folder: str | Path) -> str:
    """Digest of a folder's weight files: equal digests, equal starting weights."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def run_method(run: MethodRun, config: str, start: str, out: Path) -> dict:
    """The trainer for one method in its own process; stdout is echoed with a [method] prefix
    and kept in out/logs/<method>.out, stderr in out/logs/<method>.err."""
    cmd = [*TRAIN, "--config", config, "--output-dir", str(out / run.method),
           "--start-model", start, *run.overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # echo step lines as they come
    t0 = time.perf_counter()
    logs = out / "logs"
    with open(logs / f"{run.method}.out", "w") as log, open(logs / f"{run.method}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        for line in proc.stdout:
            log.write(line)
            print(f"[{run.method}] {line}", end="", flush=True)
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return {"command": cmd, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mib": maxrss_mib(usage.ru_maxrss)}


def maxrss_mib(ru_maxrss: int) -> float:
    return round(ru_maxrss * (1 if sys.platform == "darwin" else 1024) / MiB, 1)  # Linux: KiB


def stderr_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a run's stderr (progress-bar redraws split on \\r)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return [x for x in text.replace("\r", "\n").splitlines() if x.strip()][-lines:]


def read_row(run: MethodRun, res: dict, out: Path) -> dict:
    """One table row: what the parent measured plus the run's report.json."""
    row = {"method": run.method, "lr": run.lr, "trainable": run.trainable, "status": "ok",
           "run_dir": str(out / run.method), **res}
    report = out / run.method / "report.json"
    if res["returncode"] != 0 or not report.is_file():
        tail = stderr_tail(out / "logs" / f"{run.method}.err")
        rc = res["returncode"]
        reason = f"killed by {signal.Signals(-rc).name}" if rc < 0 else (
            tail[-1] if tail else f"exit status {rc}, no report.json")
        return dict(row, status="failed", reason=reason, stderr_tail=tail)
    s = json.loads(report.read_text())["summary"]
    ppl = s["eval"]["repaired"]["perplexity"]["ppl"] if run.cfg.eval.ppl_data else s["val_ppl"]
    sp = s["sparsity"]
    row.update(ppl=ppl, val_loss=s["val_loss"], final_loss=s["final_loss"], steps=s["steps"],
               tokens_seen=s["tokens_seen"], train_time_s=s["train_time_s"], sparsity=sp["sparsity"],
               nnz=sp["nnz"], budget=sp["budget"], exact_budget=sp["exact_budget"],
               reactivated=sp.get("reactivated"),
               lm_eval=s.get("eval", {}).get("repaired", {}).get("lm_eval"))
    if not sp["exact_budget"]:
        row.update(status="failed", reason="the budget is not exact (report.json)")
    return row


def ppl_source(cfg: RunConfig) -> str:
    e, t = cfg.eval, cfg.train
    if e.ppl_data:
        return (f"held-out perplexity of eval.ppl_data {e.ppl_data} (Wanda protocol, seqlen {e.seqlen}"
                f"{f', first {e.max_windows} windows' if e.max_windows else ''})")
    return (f"held-out perplexity = exp(held-out loss) over {t.eval_batches} validation batches of "
            f"{t.micro_batch_size} x {cfg.data.seq_len} tokens")


def format_table(result: dict) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (f"{'method':<10} {'lr':>8} {'trainable':>12} {'held-out ppl':>13} {'sparsity':>9} "
            f"{'exact':>6} {'train s':>8} {'wall s':>8} {'peak RSS MiB':>13}  status")
    lines = [result["note"], head, "-" * len(head)]
    if result["start"].get("dense_ppl") is not None:
        lines.append(f"{'(dense)':<10} {'':>8} {'':>12} {result['start']['dense_ppl']:>13.3f}  "
                     "before pruning, for reference")
    for r in result["rows"]:
        trainable = "-" if r["method"] == "none" else f"{r['trainable']:,}"
        status = r["status"] if r["status"] == "ok" else f"FAILED: {r['reason']}"
        if r["method"] == "none" and r["status"] == "ok":
            status += " (the pruned model, no repair)"
        if r["method"] == "static":
            status += " (trains all nonzeros)"
        exact = "-" if "exact_budget" not in r else ("yes" if r["exact_budget"] else "NO")
        lines.append(f"{r['method']:<10} {num(r['lr'], '.1e'):>8} {trainable:>12} "
                     f"{num(r.get('ppl'), '.3f'):>13} {num(r.get('sparsity'), '.4f'):>9} {exact:>6} "
                     f"{num(r.get('train_time_s'), '.1f'):>8} {r['wall_s']:>8.1f} "
                     f"{r['peak_rss_mib']:>13.1f}  {status}")
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> Optional[Path]:
    """Held-out perplexity per method (bars) and the training-loss curves of all runs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    color = {r["method"]: f"C{i}" for i, r in enumerate(rows)}  # one colour per method in both panels
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4))
    ok = [r for r in rows if r.get("ppl") is not None]
    bars.bar([r["method"] for r in ok], [r["ppl"] for r in ok], color=[color[r["method"]] for r in ok])
    for r in ok:
        bars.annotate(f"{r['ppl']:.2f}", (r["method"], r["ppl"]), ha="center", va="bottom", fontsize=8)
    for r in rows:
        if r["status"] == "failed" and r.get("ppl") is None:
            bars.bar(r["method"], 0)
            bars.annotate("failed", (r["method"], 0), ha="center", va="bottom", color="red")
    if result["start"].get("dense_ppl") is not None:
        bars.axhline(result["start"]["dense_ppl"], color="grey", ls="--", lw=1, label="dense")
        bars.legend(fontsize=8)
    bars.set(ylabel="held-out perplexity", title="held-out perplexity (lower is better)")
    for r in rows:
        metrics = Path(r["run_dir"], "metrics.jsonl")
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if x] if metrics.is_file() else []
        if recs:
            curves.plot([m["step"] for m in recs], [m["loss"] for m in recs], lw=1.2, label=r["method"],
                        color=color[r["method"]])
    curves.set(xlabel="step", ylabel="training loss", title="training loss")
    if curves.lines:
        curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(config: str, output_dir: str | Path, methods: list[str], lrs: dict[str, float],
            overrides: list[str]) -> dict:
    """Prune once, run every method from that model, write compare.json / compare.png; returns
    the result (rows in `methods` order). Inputs are checked before anything is written."""
    out = Path(output_dir)
    check_output_dir(out)
    base, runs = plan_runs(config, methods, lrs, overrides)
    (out / "logs").mkdir(parents=True)
    print(f"compare: building the start model once ({base.prune.method} pruning) ...", flush=True)
    start = build_start(base, out)
    start["sha256"] = folder_sha256(start["path"])
    start["builder_peak_rss_mib"] = maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    matrices = [(tuple(w.shape), int((w != 0).sum()))
                for _, w in folder_matrices(start["path"], base.seft.targets)]
    for run in runs:
        run.trainable = trainable_count(run.method, matrices, run.cfg)
    t = base.train
    tokens = t.steps * t.micro_batch_size * t.grad_accum * base.data.seq_len
    note = (f"{len(runs)} methods from {start['path']} (sha256 {start['sha256'][:12]}), each "
            f"{t.steps} steps x {t.micro_batch_size * t.grad_accum} x {base.data.seq_len} tokens "
            f"= {tokens:,} training tokens\n{ppl_source(base)}\n"
            "peak RSS: ru_maxrss of each run's process (os.wait4), model and Python/torch runtime "
            "included; wall s: spawn to exit; train s: the training loop")
    print(note)
    for run in runs:
        lr = "-" if run.lr is None else f"{run.lr:g}"
        print(f"  {run.method:<10} lr {lr:<8} trainable {run.trainable:,}")
    budgets = {r.trainable for r in runs if r.method in ("seft", "lora_star", "sqft")}
    if len(budgets) > 1:
        print("  note: seft / LoRA trainable counts differ (baseline.lora_rank or seft.density set); "
              "the comparison is not at equal budget")

    result = {"config": str(config), "overrides": list(overrides), "start": start, "note": note,
              "tokens_per_run": tokens, "ppl_source": ppl_source(base), "rows": []}
    for run in runs:
        print(f"compare: {run.method} ...", flush=True)
        row = read_row(run, run_method(run, config, start["path"], out), out)
        if row["status"] != "ok":
            print(f"compare: {run.method} FAILED: {row['reason']} (log: {out / 'logs' / run.method}.err)")
        result["rows"].append(row)
        (out / "compare.json").write_text(json.dumps(result, indent=1))  # a partial result survives a kill
    write_plot(result, out / "compare.png")
    print(format_table(result))
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return result
