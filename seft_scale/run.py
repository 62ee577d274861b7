"""The run folder: what a run writes where, which model it starts from, and how it resumes.

    <run>/config.yaml    the validated config (a resume must match it)
    <run>/pruned/        the starting sparse model, when the run builds or prunes it
    <run>/checkpoints/   method state on top of the starting model (seft_scale/checkpoint.py)
    <run>/metrics.jsonl, <run>/eval_start.json, <run>/export/, <run>/report.json

Training (train.py), the comparison (compare.py) and exporting a checkpoint (export.py) all
decide the starting model here, in one way.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from seft_scale.checkpoint import latest_checkpoint
from seft_scale.config import RunConfig, load_config, to_dict
from seft_scale.errors import ConfigError
from seft_scale.evaluate import stage_eval
from seft_scale.model import find_targets, has_weights, save_model
from seft_scale.prune import prune_model

# Keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = {"train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
               "train.check_invariants", "train.activation_checkpointing", "data.cache_dir"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class RunFolder:
    """The paths of one run's output folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.pruned = self.root / "pruned"
        self.export = self.root / "export"
        self.report = self.root / "report.json"
        self.eval_start = self.root / "eval_start.json"

    def prepare(self, cfg: RunConfig, resume: bool) -> Optional[Path]:
        """Check the folder before any heavy work; returns the checkpoint to resume from."""
        out = self.root
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output-dir: {out} exists and is not a folder")
        if not resume:
            if out.exists() and any(out.iterdir()):
                raise ConfigError(f"--output-dir: {out} is not empty; pass --resume to continue the "
                                  "run in it, or choose a new folder (nothing was changed)")
            return None
        if not self.config.is_file():
            raise ConfigError(f"--resume: {out} holds no run (no config.yaml)")
        old = _flatten(yaml.safe_load(self.config.read_text()))
        new = _flatten(to_dict(cfg))
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and k not in RESUME_FREE)
        if changed:
            raise ConfigError("--resume: the config differs from the run's saved config.yaml in "
                              + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed))
        return latest_checkpoint(out)

    def write_config(self, cfg: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def saved_config(self) -> RunConfig:
        """The run's own config (paths unchecked: a finished run needs neither its data nor its
        model path to be exported)."""
        if not self.config.is_file():
            raise ConfigError(f"--run: {self.root} holds no run (no config.yaml)")
        return load_config(str(self.config), check_paths=False)


@dataclass
class Start:
    """Where a run's starting sparse model comes from."""

    folder: Optional[Path]
    """An HF folder holding it; None when this run builds (and prunes) it."""
    save_to: Optional[Path] = None
    """Where this run saves the start it builds (<run>/pruned)."""

    @property
    def ref(self) -> Path:
        """The folder checkpoints store θ's edits against and the export compares with."""
        return self.folder if self.folder is not None else self.save_to


def plan_start(cfg: RunConfig, run: RunFolder, given: Optional[str | Path] = None) -> Start:
    """A folder given by the caller (compare: one pruned model for every method), the model.path
    that comes pruned (prune.method none), the <run>/pruned an earlier attempt of this run
    completed, or a start to build into <run>/pruned."""
    if given is not None:
        return Start(Path(given))
    if cfg.prune.method == "none" and cfg.model.path:
        return Start(Path(cfg.model.path))
    if (run.pruned / "config.json").is_file():  # written atomically: present means complete
        return Start(run.pruned)
    return Start(None, run.pruned)


def build_start(cfg: RunConfig, backend, save_to: Path, train_text: Optional[str],
                evals: Optional[dict] = None):
    """The starting model built here: cfg.model loaded (or the tiny model built) whole on rank 0,
    its dense stage measured when evaluated, pruned by cfg.prune, saved to `save_to` by rank 0
    (written beside it and renamed into place, so a killed save leaves nothing half-written).
    Returns every rank's (model, tokenizer) as backend.load_model gave them."""
    model, tok = backend.load_model(cfg.model, path=cfg.model.path, train_text=train_text,
                                    for_edit=True)
    if evals is not None and "dense" not in evals:
        evals["dense"] = stage_eval(model, tok, cfg, "dense")
    if cfg.prune.method != "none" and has_weights(model):
        prune_model(model, tok, find_targets(model, cfg.seft.targets), cfg.prune, backend.device)
    if backend.rank == 0:
        partial = save_to.with_name(f".{save_to.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_model(model, tok, partial)
        shutil.rmtree(save_to, ignore_errors=True)  # an incomplete folder of an older version
        os.replace(partial, save_to)
    backend.comm.barrier()
    return model, tok


def find_start(run: RunFolder, cfg: RunConfig, recorded: Optional[str]) -> Path:
    """The starting model of a run being exported: its <run>/pruned, the start its checkpoint
    recorded, or its model.path — the first that is a model folder."""
    for p in (run.pruned, recorded, cfg.model.path):
        if p and Path(p, "config.json").is_file():
            return Path(p)
    raise ConfigError(f"the run's starting model ({recorded or cfg.model.path}) is gone; it is "
                      "needed because checkpoints store θ as edits of it")
