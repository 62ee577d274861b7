"""Export: the merged model as a plain HF folder plus report.json, at the end of a run or from
any checkpoint of one.

The folder loads with `AutoModelForCausalLM.from_pretrained` in a process that never imports
seft_scale: the target weights are ordinary tensors with exact zeros outside the support.
`report.json` gives per target matrix the budget, the nonzeros, the positions reactivated
relative to the starting sparse model, and N:M validity (seft_scale/sparsity.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from seft_scale.backends.local import LocalBackend
from seft_scale.checkpoint import (check_checkpoint, latest_checkpoint, load_trainer_state,
                                   write_text_atomic)
from seft_scale.errors import ConfigError
from seft_scale.methods import make_method
from seft_scale.model import find_targets, load_model
from seft_scale.run import RunFolder, check_writable, find_start
from seft_scale.sparsity import summarize


def print_summary(summary: dict, export_dir: Path) -> None:
    sp, loss, ppl = summary["sparsity"], summary.get("final_loss"), summary.get("val_ppl")
    parts = ([f"loss {loss:.4f}"] if loss is not None else []) + \
        ([f"held-out ppl {ppl:.3f}"] if ppl is not None else []) + \
        [f"sparsity {sp['sparsity']:.4f} (budget exact: {sp['exact_budget']})"]
    print(f"done: {', '.join(parts)}; wrote {export_dir}")
    stages = {k: v["perplexity_texts"] for k, v in summary.get("eval", {}).items()
              if "perplexity_texts" in v}
    if stages:
        names = list(next(iter(stages.values())))
        any_ppl = next(iter(stages.values()))[names[0]]
        print(f"held-out perplexity (seqlen {any_ppl['seqlen']}):")
        print(f"  {'':9s} " + " ".join(f"{n:>12s}" for n in names))
        for stage, texts in stages.items():
            sparsity = summary["eval"][stage]["sparsity"]["summary"]["sparsity"]
            print(f"  {stage:9s} " + " ".join(f"{texts[n]['ppl']:12.3f}" for n in names)
                  + f"   sparsity {sparsity:.4f}")


def export_run(model, tokenizer, per_matrix: dict, backend, export_dir: Path,
               report_path: Optional[Path], summary: dict) -> dict:
    """Write the merged `model` to `export_dir` (plain HF folder, with seft_report.json inside)
    and the report to `report_path`; returns the summary with the sparsity totals. Every rank
    calls (sharded backends gather in save_pretrained); rank 0 writes. The folder is written
    beside `export_dir` and renamed into place, then the report: a run killed while exporting
    leaves no half-written export, and report.json only ever describes a complete one."""
    summary = dict(summary, export=str(export_dir), sparsity=summarize(per_matrix))
    partial = export_dir.with_name(f".{export_dir.name}.partial")
    if backend.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    backend.save_pretrained(model, tokenizer, partial)
    if backend.rank == 0:
        report = json.dumps({"summary": summary, "matrices": per_matrix}, indent=1)
        (partial / "seft_report.json").write_text(report)
        if export_dir.is_dir() and any(export_dir.iterdir()):
            # an export of the same final checkpoint, by an attempt killed before its report
            shutil.rmtree(export_dir)
        os.replace(partial, export_dir)
        if report_path is not None:
            write_text_atomic(report_path, report)
        print_summary(summary, export_dir)
    return summary


def export_checkpoint(run_dir: Path, ckpt: Optional[Path] = None, out: Optional[Path] = None) -> dict:
    """One process: the run's starting model + a checkpoint's state (any method; SEFT state from
    any world size) -> HF folder + report. `out` defaults to <run>/export and must not exist."""
    run = RunFolder(run_dir)
    cfg = run.saved_config()
    target = out or run.export
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out: {target} is a file; name a new folder")
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"--out: {target} exists and is not empty; choose another folder")
    check_writable(target, "--out")
    if ckpt is not None:
        reason = check_checkpoint(ckpt) if ckpt.is_dir() else "no such folder"
        if reason is not None:
            raise ConfigError(f"--checkpoint: {ckpt} is not a complete checkpoint ({reason})")
    ckpt = ckpt or latest_checkpoint(run.root)
    if ckpt is None:
        raise ConfigError(f"--checkpoint: no complete checkpoint in {run.root / 'checkpoints'}")
    target.parent.mkdir(parents=True, exist_ok=True)
    state = load_trainer_state(ckpt)
    start = find_start(run, cfg, state.get("start_model"))
    backend = LocalBackend(torch.device("cpu"))
    model, tok = load_model(cfg.model, backend.device, path=str(start))
    method = make_method(cfg, backend, model, find_targets(model, cfg.seft.targets), tok)
    method.load(ckpt)
    per_matrix = method.merge(start)
    summary = {"method": cfg.method, "steps": state["step"], "checkpoint": str(ckpt),
               "checkpoint_world_size": state["world_size"]}
    return export_run(model, tok, per_matrix, backend, target, None, summary)
