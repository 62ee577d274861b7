"""Compare repair methods on one pruned model (behind launch/compare.py).

The starting model is built and pruned once, by the run config's model and prune sections, the
way a run builds it (run.build_start), into DIR/pruned. Every training run is then its own
`python -m seft_scale.cli.train --start-model DIR/pruned` process into DIR/runs/<row>/<trial>:
the same starting weights, data, steps and batch (so the same tokens), and a trainable budget
matched to the LoRA-rank budget r·(d_in + d_out) per matrix as closely as each parameterisation
allows (methods.trainable_count gives each method's real count; static trains every nonzero).

Learning rates. Each trained method has a default (`default_lr`: its paper's value, seft the
config's train.lr). `--sweep lr` runs each method over a small grid (default: the default ×
GRID_FACTORS, a half-decade either side) and keeps the learning rate with the lowest loss on the
run's validation split (data.val_fraction of the training source, or data.validation) — never
on the held-out texts of the table (eval.ppl_data), so the table reports what the choice did not
see. A best learning rate at the edge of its grid is followed outward (`next_lr`) until a worse or
failed point brackets it: a best at the edge says only that the optimum lies further out, and a
baseline compared at the edge of its grid is compared under-tuned (every baseline's best lay beyond
the default grid in README's 5,120-token runs). `--seeds N` repeats the chosen setting with N
seeds (train.seed, data.seed, seft.init_seed shifted by 1..N-1; the sweep itself runs on the first seed) and reports mean ± sample standard
deviation. `--ablations` adds SEFT rows with config switches, each at SEFT's chosen learning rate.

Measured per run, and how:
- held-out perplexity of each named text of eval.ppl_data (Wanda protocol) on the repaired model
  (method none's is the pruned model's); without eval.ppl_data, exp of the held-out loss;
- lm-eval accuracy of eval.tasks (e.g. the offline asset:botchan/tasks), validation loss;
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
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from seft_scale.backends.local import LocalBackend
from seft_scale.config import RunConfig, load_config
from seft_scale.data import tokenizer_training_text
from seft_scale.errors import ConfigError
from seft_scale.evaluate import folder_matrices
from seft_scale.methods import METHODS as METHOD_CLASSES
from seft_scale.methods import trainable_count
from seft_scale.run import build_start as build_run_start

METHODS = typing.get_args(typing.get_type_hints(RunConfig)["method"])
DEFAULT_METHODS = ("none", "static", "lora_star", "sqft", "spp", "seft")
TRAINED = tuple(m for m in METHODS if m != "none")
# --sweep lr: the default learning rate times these (half a decade either side).
GRID_FACTORS = (10 ** -0.5, 1.0, 10 ** 0.5)
# --sweep lr: at most this many points added per method while its best lies at an edge of the grid
GRID_EXTENSIONS = 3
# Config switches an ablation row may set (SEFT's; any seft.* key is accepted).
SWEEPS = ("lr",)
TRAIN = [sys.executable, "-m", "seft_scale.cli.train"]
MiB = 1 << 20


def default_lr(method: str, base: RunConfig) -> Optional[float]:
    """The method's paper learning rate (seft_scale/baselines/*: PaperDefaults.lr); seft keeps the
    config's train.lr, which the run configs tune for it; none trains nothing."""
    if method == "none":
        return None
    if method == "seft":
        return base.train.lr
    return METHOD_CLASSES[method].paper.lr


@dataclass
class Trial:
    """One training process."""

    row: str
    method: str
    lr: Optional[float]
    seed: int  # index: 0 is the config's seeds
    overrides: list[str]
    cfg: RunConfig
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return ("pruned" if self.lr is None else f"lr{self.lr:.3g}") + f"-seed{self.seed}"


@dataclass
class Row:
    """One table row: a method, or SEFT with ablation switches."""

    label: str
    method: str
    switches: list[str]  # ablation overrides
    grid: list[Optional[float]]
    trials: list[Trial] = field(default_factory=list)
    chosen_lr: Optional[float] = None
    trainable: int = 0

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.label)


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


def _positive(value: str, flag: str, name: str) -> float:
    try:
        lr = float(value)
    except ValueError:
        raise ConfigError(f"{flag}: {value!r} (for {name}) is not a number") from None
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"{flag}: {name}={value} must be a finite number > 0")
    return lr


def _per_method(text: Optional[str], flag: str, example: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(";" if flag == "--grid" else ","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise ConfigError(f"{flag}: {item!r} is not method=value (e.g. {example})")
        if name not in TRAINED:
            raise ConfigError(f"{flag}: {name!r} takes no learning rate; methods that train: "
                              f"{', '.join(TRAINED)}")
        if name in out:
            raise ConfigError(f"{flag}: {name} given more than once")
        out[name] = value
    return out


def parse_lrs(text: Optional[str]) -> dict[str, float]:
    """'seft=2e-3,static=5e-5' -> {method: lr}; only methods that train take a learning rate."""
    return {k: _positive(v, "--lr", k) for k, v in
            _per_method(text, "--lr", "seft=2e-3,static=5e-5").items()}


def parse_grids(text: Optional[str]) -> dict[str, list[float]]:
    """'seft=1e-3,2e-3,4e-3;static=1e-5,5e-5' -> {method: [lr, ...]} (--sweep lr grids)."""
    out = {}
    for k, v in _per_method(text, "--grid", "seft=1e-3,2e-3;static=1e-5,5e-5").items():
        lrs = [_positive(x.strip(), "--grid", k) for x in v.split(",") if x.strip()]
        if not lrs or len(set(lrs)) != len(lrs):
            raise ConfigError(f"--grid: {k} needs distinct learning rates, got {v!r}")
        out[k] = sorted(lrs)
    return out


def parse_ablations(text: Optional[str]) -> list[list[str]]:
    """'seft.merge_dropped=false,seft.adapt_criterion=magnitude' -> one row per item; '+' joins
    switches of one row (seft.merge_dropped=false+seft.reactivation=false)."""
    rows = []
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        switches = [s.strip() for s in item.split("+") if s.strip()]
        for s in switches:
            key = s.split("=", 1)[0]
            if "=" not in s or not key.startswith("seft."):
                raise ConfigError(f"--ablations: {s!r} is not a seft.key=value switch "
                                  "(e.g. seft.merge_dropped=false)")
        if switches in rows:
            raise ConfigError(f"--ablations: {item!r} given more than once")
        rows.append(switches)
    return rows


def seed_overrides(base: RunConfig, seed: int) -> list[str]:
    """Seed index 0 is the config itself; index i shifts every seed of the run by i."""
    if seed == 0:
        return []
    return [f"train.seed={base.train.seed + seed}", f"data.seed={base.data.seed + seed}",
            f"seft.init_seed={base.seft.init_seed + seed}"]


def has_validation(cfg: RunConfig) -> bool:
    return cfg.train.eval_batches > 0 and (cfg.data.val_fraction > 0 or bool(cfg.data.validation))


def plan_rows(config: str, methods: list[str], lrs: dict[str, float], overrides: list[str],
              sweep: Optional[str] = None, grids: Optional[dict[str, list[float]]] = None,
              seeds: int = 1, ablations: Optional[list[list[str]]] = None) -> tuple[RunConfig, list[Row]]:
    """The base config and every row with its grid; every config a trial will use is loaded and
    validated here, before anything is written."""
    grids, ablations = grids or {}, ablations or []
    for item in overrides:
        if item.split("=", 1)[0].strip() == "method":
            raise ConfigError(f"override {item!r}: compare sets each run's method; use --methods")
    if sweep is not None and sweep not in SWEEPS:
        raise ConfigError(f"--sweep: {sweep!r} is not sweepable; choose from {', '.join(SWEEPS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {seeds}")
    unused = sorted(set(grids) - set(methods) - ({"seft"} if ablations else set()))
    if unused or (grids and sweep is None):
        raise ConfigError(f"--grid: {'needs --sweep lr' if not unused else f'{unused} not in --methods'}")
    base = load_config(config, overrides)
    if not base.eval.ppl_data and not base.train.eval_batches:
        raise ConfigError("eval.ppl_data / train.eval_batches: a comparison needs a held-out measure; "
                          "set eval.ppl_data (perplexity) or train.eval_batches > 0 (held-out loss)")
    if sweep and not has_validation(base):
        raise ConfigError("--sweep lr picks by the loss on the validation split: set "
                          "data.val_fraction > 0 (or data.validation) and train.eval_batches > 0")
    rows = []
    for m in methods:
        centre = lrs.get(m) or default_lr(m, base)
        if m == "none":
            grid = [None]
        elif sweep:
            grid = grids.get(m) or [float(f"{centre * f:.3g}") for f in GRID_FACTORS]
        else:
            grid = [centre]
        rows.append(Row(m, m, [], grid))
    seft_row = next((r for r in rows if r.method == "seft"), None)
    for switches in ablations:
        grid = seft_row.grid if seft_row else [lrs.get("seft") or base.train.lr]
        rows.append(Row("seft " + " ".join(s.removeprefix("seft.") for s in switches), "seft", switches,
                        grid if seft_row is None else []))
    for row in rows:  # validate every configuration now
        for lr in row.grid or [base.train.lr]:
            for s in range(seeds if row.method != "none" else 1):
                make_trial(config, row, lr if row.method != "none" else None, s, overrides, base)
    return base, rows


def make_trial(config: str, row: Row, lr: Optional[float], seed: int, overrides: list[str],
               base: RunConfig) -> Trial:
    extra = [f"method={row.method}"] + row.switches + ([f"train.lr={lr!r}"] if lr is not None else [])
    if base.eval.ppl_data or base.eval.tasks:  # one evaluation per run: its result
        extra.append("eval.stages=[repaired]")
    ov = list(overrides) + extra + seed_overrides(base, seed)
    return Trial(row.label, row.method, lr, seed, ov, load_config(config, ov))


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
    texts = (dense or {}).get("perplexity_texts", {})
    return {"path": str(out / "pruned"), "pruned_by": f"{cfg.prune.method} {cfg.prune.pattern} "
            f"sparsity {cfg.prune.sparsity}", "time_s": round(time.perf_counter() - t0, 3),
            "dense_ppl": {k: v["ppl"] for k, v in texts.items()} or None}


def folder_sha256(folder: str | Path) -> str:
    """Digest of a folder's weight files: equal digests, equal starting weights."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def run_trial(trial: Trial, config: str, start: str, run_dir: Path, log: Path) -> dict:
    """The trainer for one trial in its own process; stdout is echoed with a [row lr seed] prefix
    and kept in <log>.out, stderr in <log>.err."""
    cmd = [*TRAIN, "--config", config, "--output-dir", str(run_dir), "--start-model", start,
           *trial.overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # echo step lines as they come
    t0 = time.perf_counter()
    tag = f"[{trial.row} {trial.name}]"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            for line in proc.stdout:
                out.write(line)
                print(f"{tag} {line}", end="", flush=True)
        except BaseException:  # interrupted or terminated (cli: SIGTERM -> SystemExit): no orphan run
            proc.kill()
            proc.wait()
            raise
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return {"command": cmd, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 3),
            "peak_rss_mib": maxrss_mib(usage.ru_maxrss), "run_dir": str(run_dir), "log": str(log)}


def maxrss_mib(ru_maxrss: int) -> float:
    return round(ru_maxrss * (1 if sys.platform == "darwin" else 1024) / MiB, 1)  # Linux: KiB


def stderr_tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a run's stderr (progress-bar redraws split on \\r)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return [x for x in text.replace("\r", "\n").splitlines() if x.strip()][-lines:]


def read_trial(trial: Trial, res: dict) -> dict:
    """What one trial measured: the parent's figures plus the run's report.json."""
    out = {"lr": trial.lr, "seed": trial.seed, "status": "ok", **res}
    report = Path(res["run_dir"]) / "report.json"
    if res["returncode"] != 0 or not report.is_file():
        tail = stderr_tail(Path(f"{res['log']}.err"))
        rc = res["returncode"]
        reason = f"killed by {signal.Signals(-rc).name}" if rc < 0 else (
            tail[-1] if tail else f"exit status {rc}, no report.json")
        return dict(out, status="failed", reason=reason, stderr_tail=tail)
    s = json.loads(report.read_text())["summary"]
    repaired = s.get("eval", {}).get("repaired", {})
    texts = {k: v["ppl"] for k, v in repaired.get("perplexity_texts", {}).items()}
    if not texts and s.get("val_ppl") is not None:
        texts = {"val": s["val_ppl"]}
    sp = s["sparsity"]
    out.update(ppl=texts, val_loss=s["val_loss"], final_loss=s["final_loss"], steps=s["steps"],
               tokens_seen=s["tokens_seen"], train_time_s=s["train_time_s"], sparsity=sp["sparsity"],
               nnz=sp["nnz"], budget=sp["budget"], exact_budget=sp["exact_budget"],
               nm_valid=sp.get("nm_valid"), reactivated=sp.get("reactivated"),
               lm_eval=repaired.get("lm_eval"))
    if not sp["exact_budget"] or sp.get("nm_valid") is False:
        out.update(status="failed", reason="the budget or the N:M pattern is not exact (report.json)")
    return out


def choose_lr(results: list[dict]) -> Optional[float]:
    """The learning rate of the lowest validation loss among ok results (grid order breaks
    ties); None when none finished with a finite one. Only the validation split decides: the
    held-out texts of the table play no part."""
    ok = [r for r in results if r["status"] == "ok" and r.get("val_loss") is not None
          and math.isfinite(r["val_loss"])]
    return min(ok, key=lambda r: r["val_loss"])["lr"] if ok else None


def next_lr(grid: list[float], best: Optional[float]) -> Optional[float]:
    """The next learning rate out when `best` is the largest or smallest of `grid` (one step on,
    the step being the ratio of the two outermost points on that side, 3 significant digits);
    None when `best` lies inside the grid or there is no grid."""
    g = sorted(grid)
    if best is None or len(g) < 2 or g[0] < best < g[-1]:
        return None
    edge, inner = (g[-1], g[-2]) if best == g[-1] else (g[0], g[1])
    return float(f"{edge * edge / inner:.3g}")


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarize_row(row: Row) -> dict:
    """The row of the table: its chosen learning rate's trials, aggregated over seeds."""
    results = [t.result for t in row.trials]
    chosen = [r for r in results if r["lr"] == row.chosen_lr]
    out = {"label": row.label, "method": row.method, "switches": row.switches,
           "grid": sorted(r["lr"] for r in results if r["seed"] == 0) if row.method != "none" else [],
           "lr": row.chosen_lr, "trainable": row.trainable, "trials": results,
           "sweep": {f"{r['lr']:.3g}": r.get("val_loss") for r in results if r["seed"] == 0
                     and r["lr"] is not None}}
    failed = [r for r in chosen if r["status"] != "ok"]
    if not chosen or failed:
        bad = failed[0] if failed else (results[0] if results else {})
        reason = bad.get("reason") if failed or len(results) == 1 else None
        return dict(out, status="failed", reason=reason or ("every trial of the grid failed" if results
                                                            else "seft itself failed: no lr to use"),
                    stderr_tail=bad.get("stderr_tail", []))
    names = list(chosen[0]["ppl"])
    tasks = sorted(chosen[0].get("lm_eval") or {})
    first = chosen[0]
    out.update(status="ok", seeds=len(chosen),
               ppl={n: mean_sd([r["ppl"][n] for r in chosen]) for n in names},
               acc={t: mean_sd([r["lm_eval"][t]["acc"] for r in chosen]) for t in tasks},
               val_loss=mean_sd([r["val_loss"] for r in chosen]) if first["val_loss"] is not None else None,
               train_time_s=statistics.fmean(r["train_time_s"] for r in chosen),
               wall_s=statistics.fmean(r["wall_s"] for r in chosen),
               peak_rss_mib=max(r["peak_rss_mib"] for r in chosen),
               sparsity=first["sparsity"], nnz=first["nnz"], budget=first["budget"],
               exact_budget=all(r["exact_budget"] for r in chosen), nm_valid=first.get("nm_valid"),
               tokens_seen=first["tokens_seen"], run_dir=first["run_dir"])
    return out


def ppl_source(cfg: RunConfig) -> str:
    e, t = cfg.eval, cfg.train
    if e.ppl_data:
        texts = ", ".join(f"{k} = {v}" for k, v in e.ppl_sets().items())
        return (f"held-out perplexity (Wanda protocol, seqlen {e.seqlen}"
                f"{f', first {e.max_windows} windows' if e.max_windows else ''}) of eval.ppl_data: {texts}")
    return (f"held-out perplexity = exp(held-out loss) over {t.eval_batches} validation batches of "
            f"{t.micro_batch_size} x {cfg.data.seq_len} tokens")


def _cell(stat: Optional[dict], fmt: str) -> str:
    if stat is None:
        return "-"
    if stat["n"] > 1:
        return f"{format(stat['mean'], fmt)}±{format(stat['sd'], fmt)}"
    return format(stat["mean"], fmt)


def _lr(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2g}"


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, cells) of the comparison table."""
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    names = list(ok[0]["ppl"]) if ok else []
    tasks = list(ok[0]["acc"]) if ok else []
    head = (["method", "lr grid", "lr", "trainable"] + [f"ppl {n}" for n in names]
            + (["val loss"] if any(r.get("val_loss") for r in ok) else [])
            + [f"acc {t}" for t in tasks] + ["sparsity", "exact", "train s", "wall s", "peak MiB"])
    cells = []
    dense = result["start"].get("dense_ppl") or {}
    if dense:
        cells.append(["(dense)", "", "", ""] + [f"{dense.get(n, float('nan')):.2f}" for n in names]
                     + [""] * (len(head) - 4 - len(names)))
    for r in rows:
        grid = ",".join(_lr(x) for x in r["grid"]) if len(r["grid"]) > 1 else "-"
        trainable = "-" if r["method"] == "none" else f"{r['trainable']:,}"
        if r["status"] != "ok":
            cells.append([r["label"], grid, _lr(r["lr"]), trainable, f"FAILED: {r['reason']}"])
            continue
        exact = "yes" if r["exact_budget"] and r.get("nm_valid") is not False else "NO"
        line = [r["label"], grid, _lr(r["lr"]), trainable] + [_cell(r["ppl"][n], ".2f") for n in names]
        if "val loss" in head:
            line.append(_cell(r.get("val_loss"), ".3f"))
        line += [_cell(r["acc"].get(t), ".3f") for t in tasks]
        line += [f"{r['sparsity']:.4f}", exact, f"{r['train_time_s']:.0f}", f"{r['wall_s']:.0f}",
                 f"{r['peak_rss_mib']:.0f}"]
        cells.append(line)
    return head, cells


def format_table(result: dict, markdown: bool = False) -> str:
    head, cells = table_rows(result)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c + [""] * (len(head) - len(c))) + " |"
                                  for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells if i < len(c) and not c[-1].startswith("FAILED")))
              if cells else len(h) for i, h in enumerate(head)]
    fmt = lambda c: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                              for i, (x, w) in enumerate(zip(c, widths)))
    lines = [result["note"], fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    for c in cells:
        lines.append(fmt(c) if not c[-1].startswith("FAILED") else "  ".join(c))
    return "\n".join(lines)


def write_plot(result: dict, path: Path) -> Optional[Path]:
    """Held-out perplexity per method and text (grouped bars) and the training-loss curves of
    each row's chosen run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    names = list(ok[0]["ppl"]) if ok else []
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(len(names), 1)
    for j, n in enumerate(names):
        xs = [i + j * width for i in range(len(ok))]
        vals = [r["ppl"][n]["mean"] for r in ok]
        errs = [r["ppl"][n]["sd"] for r in ok]
        bars.bar(xs, vals, width, yerr=errs if any(errs) else None, label=n, color=f"C{j}")
        for x, v in zip(xs, vals):
            bars.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize=7)
        dense = (result["start"].get("dense_ppl") or {}).get(n)
        if dense is not None:
            bars.axhline(dense, color=f"C{j}", ls="--", lw=1)
    bars.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(ok))])
    bars.set_xticklabels([r["label"] for r in ok], rotation=30, ha="right", fontsize=8)
    bars.set(ylabel="held-out perplexity", title="held-out perplexity (lower is better; dashed: dense)")
    if names:
        bars.legend(fontsize=8, loc="lower left")
    for i, r in enumerate(rows):
        metrics = Path(r.get("run_dir") or "", "metrics.jsonl")
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if x] if metrics.is_file() else []
        if recs:
            curves.plot([m["step"] for m in recs], [m["loss"] for m in recs], lw=1.1, label=r["label"],
                        color=f"C{i % 10}", ls="-" if i < 10 else "--")
    curves.set(xlabel="step", ylabel="training loss", title="training loss (chosen lr, first seed)")
    if curves.lines:
        curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(config: str, output_dir: str | Path, methods: list[str], lrs: dict[str, float],
            overrides: list[str], sweep: Optional[str] = None,
            grids: Optional[dict[str, list[float]]] = None, seeds: int = 1,
            ablations: Optional[list[list[str]]] = None) -> dict:
    """Prune once, run every row (sweep, seeds, ablations) from that model, write compare.json /
    compare.md / compare.png; returns the result (rows in `methods` order, then the ablations).
    Inputs are checked before anything is written."""
    out = Path(output_dir)
    check_output_dir(out)
    base, rows = plan_rows(config, methods, lrs, overrides, sweep, grids, seeds, ablations)
    out.mkdir(parents=True, exist_ok=True)
    print(f"compare: building the start model once ({base.prune.method} pruning) ...", flush=True)
    start = build_start(base, out)
    start["sha256"] = folder_sha256(start["path"])
    start["builder_peak_rss_mib"] = maxrss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    matrices = [(tuple(w.shape), int((w != 0).sum()))
                for _, w in folder_matrices(start["path"], base.seft.targets)]
    for row in rows:
        lr = row.grid[0] if row.grid else base.train.lr
        row.trainable = trainable_count(row.method, matrices, make_trial(config, row, lr, 0, overrides, base).cfg)
    t = base.train
    tokens = t.steps * t.micro_batch_size * t.grad_accum * base.data.seq_len
    lora = sum(((base.baseline.lora_rank or base.seft.lora_rank or 0) * (s[0] + s[1])) for s, _ in matrices)
    note = (f"{len(rows)} rows from {start['path']} (sha256 {start['sha256'][:12]}), each run "
            f"{t.steps} steps x {t.micro_batch_size * t.grad_accum} x {base.data.seq_len} tokens "
            f"= {tokens:,} training tokens; LoRA-rank budget r(d_in+d_out) = {lora:,}\n{ppl_source(base)}\n"
            + (f"lr: chosen from the grid by the lowest validation loss ({t.eval_batches} batches of "
               f"the training source's held-out split; never the texts above)" if sweep else
               "lr: each method's default (no --sweep)")
            + (f"; {seeds} seeds: mean±sd" if seeds > 1 else "")
            + "\npeak MiB: ru_maxrss of each run's process (os.wait4), model and Python/torch runtime "
            "included; wall s: spawn to exit; train s: the training loop")
    print(note)
    for row in rows:
        grid = ",".join(_lr(x) for x in row.grid) or "seft's chosen"
        print(f"  {row.label:<28} lr {grid:<24} "
              f"trainable {row.trainable:,}")

    result = {"config": str(config), "overrides": list(overrides), "start": start, "note": note,
              "tokens_per_run": tokens, "ppl_source": ppl_source(base), "sweep": sweep, "seeds": seeds,
              "rows": []}

    def run(row: Row, lr: Optional[float], seed: int) -> dict:
        trial = make_trial(config, row, lr, seed, overrides, base)
        print(f"compare: {row.label} {trial.name} ...", flush=True)
        res = run_trial(trial, config, start["path"], out / "runs" / row.folder / trial.name,
                        out / "logs" / row.folder / trial.name)
        trial.result = read_trial(trial, res)
        if trial.result["status"] != "ok":
            print(f"compare: {row.label} {trial.name} FAILED: {trial.result['reason']} "
                  f"(log: {trial.result['log']}.err)")
        row.trials.append(trial)
        return trial.result

    chosen_seft = None
    for row in rows:
        if not row.grid:  # an ablation: SEFT's chosen learning rate
            row.grid = [chosen_seft] if chosen_seft is not None else []
        first = [run(row, lr, 0) for lr in row.grid]
        row.chosen_lr = first[0]["lr"] if len(first) == 1 else choose_lr(first)
        for _ in range(GRID_EXTENSIONS if sweep and len(row.grid) > 1 else 0):
            lr = next_lr(row.grid, row.chosen_lr)  # the best at an edge: one step further out
            if lr is None or lr in row.grid:
                break
            row.grid.append(lr)
            first.append(run(row, lr, 0))
            row.chosen_lr = choose_lr(first)
        if row.method == "seft" and not row.switches:
            chosen_seft = row.chosen_lr
        if row.chosen_lr is not None or row.method == "none":
            for s in range(1, seeds if row.method != "none" else 1):
                run(row, row.chosen_lr, s)
        result["rows"].append(summarize_row(row))
        (out / "compare.json").write_text(json.dumps(result, indent=1))  # a partial result survives a kill
    return render(out, result)


def render(out: Path, result: Optional[dict] = None) -> dict:
    """Print the table and write compare.md / compare.png from a result (default: out/compare.json,
    e.g. the rows a stopped comparison had finished)."""
    out = Path(out)
    if result is None:
        path = out / "compare.json"
        if not path.is_file():
            raise ConfigError(f"--render: {out} holds no compare.json")
        result = json.loads(path.read_text())
    write_plot(result, out / "compare.png")
    (out / "compare.md").write_text(format_table(result, markdown=True) + "\n")
    print(format_table(result))
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.png'}")
    return result
