"""Export: merge W = θ + S into the model, save a plain HF folder, and report the sparsity.

The folder loads with `AutoModelForCausalLM.from_pretrained` in a process that never imports
seft_scale: the target weights are ordinary tensors with exact zeros outside the support.
`report.json` gives per target matrix the budget, the nonzeros, the positions reactivated
relative to the starting sparse model, and N:M validity.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from seft_scale.delta import SparseDelta, SparseDeltaLinear
from seft_scale.sparsity.nm import nm_valid


class SafetensorsFolder:
    """Read single tensors of an HF folder (sharded or not) without loading the model."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(self.folder / "model.safetensors"), "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.folder / self.where[key]), "pt") as f:
            return f.get_tensor(key)


def matrix_report(merged: torch.Tensor, support: torch.Tensor, start: Optional[torch.Tensor],
                  budget: int, nm: Optional[tuple[int, int]]) -> dict:
    """`support` is the mask M; the exported weight is zero outside it (checked here)."""
    nz = merged != 0
    if bool((nz & ~support).any()):
        raise AssertionError("merged weight has nonzeros outside the support")
    entry = {"shape": list(merged.shape), "budget": budget, "support": int(support.sum()),
             "nnz": int(nz.sum()), "density": float(nz.float().mean())}
    if start is not None:
        start = start.to(merged.device)
        entry["reactivated"] = int((nz & (start == 0)).sum())
        entry["pruned_from_start"] = int((~nz & (start != 0)).sum())
    if nm is not None:
        entry["nm_valid"] = nm_valid(merged, *nm)
    return entry


@torch.no_grad()
def merge_deltas(model, deltas: Sequence[SparseDelta], backend, start_dir: Optional[Path],
                 nm: Optional[tuple[int, int]]) -> dict:
    """Write θ + S into each target weight (in place, on the only rank) and return the report."""
    start = SafetensorsFolder(start_dir) if start_dir is not None else None
    modules = dict(model.named_modules())
    per_matrix = {}
    for d, full, support in backend.full_matrices(deltas):
        if full is None:
            continue
        mod = modules[d.name]
        mod.weight.data.copy_(full.to(mod.weight.dtype))
        ref = start.get(f"{d.name}.weight") if start is not None else None
        per_matrix[d.name] = matrix_report(mod.weight.data, support, ref, d.budget, nm)
    for mod in modules.values():
        if isinstance(mod, SparseDeltaLinear):
            mod.detach_delta()
    return per_matrix


def summarize(per_matrix: dict) -> dict:
    budget = sum(m["budget"] for m in per_matrix.values())
    nnz = sum(m["nnz"] for m in per_matrix.values())
    numel = sum(m["shape"][0] * m["shape"][1] for m in per_matrix.values())
    out = {"matrices": len(per_matrix), "budget": budget, "nnz": nnz, "numel": numel,
           "sparsity": 1 - nnz / max(numel, 1),
           "exact_budget": all(m["support"] == m["budget"] and m["nnz"] <= m["budget"]
                               for m in per_matrix.values())}
    if any("reactivated" in m for m in per_matrix.values()):
        out["reactivated"] = sum(m.get("reactivated", 0) for m in per_matrix.values())
    if any("nm_valid" in m for m in per_matrix.values()):
        out["nm_valid"] = all(m["nm_valid"] for m in per_matrix.values())
    return out


def export_run(model, tokenizer, per_matrix: dict, backend, export_dir: Path,
               report_path: Optional[Path], summary: dict) -> dict:
    """Write the merged `model` to `export_dir` (plain HF folder, with seft_report.json inside)
    and the report to `report_path`; returns the summary with the sparsity totals. Rank 0
    writes; every rank must call (sharded backends gather in save_pretrained)."""
    summary = dict(summary, export=str(export_dir),
                   sparsity=summarize(per_matrix) if backend.rank == 0 else None)
    backend.save_pretrained(model, tokenizer, export_dir)
    if backend.rank == 0:
        report = json.dumps({"summary": summary, "matrices": per_matrix}, indent=1)
        (export_dir / "seft_report.json").write_text(report)
        if report_path is not None:
            report_path.write_text(report)
        sp, loss, ppl = summary["sparsity"], summary.get("final_loss"), summary.get("val_ppl")
        parts = ([f"loss {loss:.4f}"] if loss is not None else []) + \
            ([f"held-out ppl {ppl:.3f}"] if ppl is not None else []) + \
            [f"sparsity {sp['sparsity']:.4f} (budget exact: {sp['exact_budget']})"]
        print(f"done: {', '.join(parts)}; wrote {export_dir}")
        stages = {k: v["perplexity"] for k, v in summary.get("eval", {}).items() if "perplexity" in v}
        if stages:
            any_ppl = next(iter(stages.values()))
            print(f"held-out perplexity (seqlen {any_ppl['seqlen']}, {any_ppl['windows']} windows):")
            for stage, p in stages.items():
                sparsity = summary["eval"][stage]["sparsity"]["summary"]["sparsity"]
                print(f"  {stage:9s} {p['ppl']:10.3f}   sparsity {sparsity:.4f}")
    return summary


def export_checkpoint(run: Path, ckpt: Optional[Path] = None, out: Optional[Path] = None) -> dict:
    """One process: the run's starting model + a checkpoint's state (any method; SEFT state from
    any world size) -> HF folder + report. `out` defaults to <run>/export and must not exist."""
    from seft_scale.backends.local import LocalBackend
    from seft_scale.checkpoint import latest_checkpoint, load_trainer_state
    from seft_scale.config import ConfigError, load_config
    from seft_scale.methods import make_method
    from seft_scale.model import find_targets, load_model
    from seft_scale.sparsity.nm import parse_pattern

    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--run: {run} holds no run (no config.yaml)")
    cfg = load_config(str(run / "config.yaml"), check_paths=False)
    ckpt = ckpt or latest_checkpoint(run)
    if ckpt is None or not (ckpt / "trainer.json").is_file():
        raise ConfigError(f"--checkpoint: no complete checkpoint in {ckpt or run / 'checkpoints'}")
    target = out or run / "export"
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"--out: {target} exists and is not empty; choose another folder")
    state = load_trainer_state(ckpt)
    start = next((str(p) for p in (run / "pruned", state.get("start_model"), cfg.model.path)
                  if p and Path(p, "config.json").is_file()), None)
    if not start or not Path(start, "config.json").is_file():
        raise ConfigError(f"the run's starting model ({start}) is gone; it is needed because "
                          "checkpoints store θ as edits of it")
    backend = LocalBackend(torch.device("cpu"))
    model, tok = load_model(cfg.model, backend.device, path=str(start))
    nm = parse_pattern(cfg.prune.pattern)
    method = make_method(cfg, backend, model, find_targets(model, cfg.seft.targets), tok, nm)
    method.load(ckpt)
    per_matrix = method.merge(model, Path(start), nm)
    summary = {"method": cfg.method, "steps": state["step"], "checkpoint": str(ckpt),
               "checkpoint_world_size": state["world_size"]}
    return export_run(model, tok, per_matrix, backend, target, None, summary)
