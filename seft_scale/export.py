"""Export: merge W = θ + S into the model, save a plain HF folder, and report the sparsity.

The folder loads with `AutoModelForCausalLM.from_pretrained` in a process that never imports
seft_scale: the target weights are ordinary tensors with exact zeros outside the support.
`report.json` gives per target matrix the budget, the nonzeros, the positions reactivated
relative to the starting sparse model, and N:M validity.
"""
from __future__ import annotations

import json
import shutil
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


def export_run(model, tokenizer, deltas: Sequence[SparseDelta], backend, out: Path,
               start_dir: Optional[Path], nm: Optional[tuple[int, int]], summary: dict) -> dict:
    """Merge, write <out>/export (plain HF folder) and <out>/report.json; returns the summary
    with the sparsity totals. Rank 0 writes; every rank must call."""
    per_matrix = merge_deltas(model, deltas, backend, start_dir, nm)
    summary = dict(summary, export=str(out / "export"),
                   sparsity=summarize(per_matrix) if backend.rank == 0 else None)
    backend.save_pretrained(model, tokenizer, out / "export")
    if backend.rank == 0:
        (out / "report.json").write_text(json.dumps({"summary": summary, "matrices": per_matrix},
                                                    indent=1))
        shutil.copy(out / "report.json", out / "export" / "seft_report.json")
        sp = summary["sparsity"]
        loss = summary.get("final_loss")
        ppl = summary.get("val_ppl")
        print(f"done: loss {'-' if loss is None else f'{loss:.4f}'}, held-out ppl "
              f"{'-' if ppl is None else f'{ppl:.3f}'}, sparsity {sp['sparsity']:.4f} "
              f"(budget exact: {sp['exact_budget']}); wrote {out / 'export'}")
    return summary
