"""The run folder: what a run writes where, which model it starts from, and how it resumes.

    <run>/config.yaml    the validated config (a resume must match it); the run's first write
    <run>/pruned/        the starting sparse model, when the run builds or prunes it
    <run>/checkpoints/   method state on top of the starting model (seft_scale/checkpoint.py)
    <run>/metrics.jsonl, <run>/eval_start.json, <run>/export/, <run>/report.json

Every folder is built beside its final name and renamed into place, and every JSON/YAML file is
written to a temporary name and renamed, so a kill at any moment leaves either the old state or
the new one. Every check that needs no weights loaded (`check_start`) runs before the first write,
so a run that cannot start leaves its folder as it was and can be retried in it.

Training (train.py), the comparison (compare.py) and exporting a checkpoint (export.py) all
decide the starting model here, in one way.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from transformers import AutoTokenizer

from seft_scale.checkpoint import ResumePoint, find_resume_point, set_aside, write_text_atomic
from seft_scale.config import RunConfig, load_config, max_positions, to_dict
from seft_scale.errors import ConfigError
from seft_scale.evaluate import stage_eval
from seft_scale.model import (SafetensorsFolder, check_weights, find_targets, has_weights, save_model,
                              skeleton, train_tokenizer)
from seft_scale.prune import prune_model
from seft_scale.prune.masks import kept_count
from seft_scale.prune.sequential import check_shapes
from seft_scale.seft.budget import slot_capacity

# Keys that may differ between a run and its resumption (they do not change the result).
RESUME_FREE = {"train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
               "train.check_invariants", "train.activation_checkpointing", "data.cache_dir"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_writable(folder: Path, key: str = "--output-dir") -> None:
    """`folder` can be created and written, judged from its nearest existing ancestor (nothing
    is created here); `key` is the flag that named it."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: cannot create {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write into {existing} (permission denied)")


class RunFolder:
    """The paths of one run's output folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.pruned = self.root / "pruned"
        self.export = self.root / "export"
        self.report = self.root / "report.json"
        self.eval_start = self.root / "eval_start.json"

    def prepare(self, cfg: RunConfig, resume: bool) -> Optional[ResumePoint]:
        """Check the folder before any heavy work (reads only); returns, for a run to resume,
        what its checkpoints hold, and None for a run that starts from nothing."""
        out = self.root
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--output-dir: {out} exists and is not a folder")
        check_writable(out)
        empty = not out.exists() or not any(out.iterdir())
        if not resume:
            if not empty:
                raise ConfigError(f"--output-dir: {out} is not empty; pass --resume to continue the "
                                  "run in it, or choose a new folder (nothing was changed)")
            return None
        if not self.config.is_file():
            if empty:  # a requeued job whose first attempt died before writing anything
                return None
            raise ConfigError(f"--resume: {out} holds no run (no config.yaml) and is not empty; "
                              "choose another folder (nothing was changed)")
        old = _flatten(yaml.safe_load(self.config.read_text()))
        new = _flatten(to_dict(cfg))
        changed = sorted(k for k in set(old) | set(new)
                         if old.get(k) != new.get(k) and k not in RESUME_FREE)
        if changed:
            raise ConfigError("--resume: the config differs from the run's saved config.yaml in "
                              + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed))
        return find_resume_point(out)

    def finished_summary(self) -> Optional[dict]:
        """The summary of a run that has finished (report.json beside its export/), else None."""
        if not self.export.is_dir():
            return None
        try:
            return json.loads(self.report.read_text())["summary"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_config(self, cfg: RunConfig) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def saved_config(self) -> RunConfig:
        """The run's own config (paths unchecked: a finished run needs neither its data nor its
        model path to be exported)."""
        if not self.config.is_file():
            raise ConfigError(f"--run: {self.root} holds no run (no config.yaml)")
        return load_config(str(self.config), check_paths=False)


def settle_resume(point: Optional[ResumePoint], run: RunFolder) -> None:
    """Rank 0, once every rank has read the checkpoints: set aside the unreadable ones newer
    than the resume point (a later save of the same step would replace them; their files may
    still be worth a look) and say where the run continues."""
    for ckpt, reason in point.unreadable if point else []:
        kept = set_aside(ckpt)
        print(f"--resume: {ckpt} is not a complete checkpoint ({reason}); kept as {kept.name}")
    if point is None or point.checkpoint is None:
        found = "no complete checkpoint is left" if point and point.unreadable else "no checkpoint"
        print(f"--resume: {found} in {run.root / 'checkpoints'}; starting from step 1"
              + (f" with the saved starting model {run.pruned}" if run.pruned.is_dir() else ""))


def on_rank0(comm, what: str, check: Callable[[], None]) -> None:
    """`check` on rank 0 only (it may read a model's files), its ConfigError raised on every rank,
    so all ranks stop with the same one-line message instead of waiting for a dead rank 0."""
    error = None
    if comm.rank == 0:
        try:
            check()
        except ConfigError as e:
            error = str(e)
    comm.wait(what)
    error = comm.broadcast_object(error)
    if error is not None:
        raise ConfigError(error)


@dataclass
class Start:
    """Where a run's starting sparse model comes from."""

    folder: Optional[Path]
    """An HF folder holding it; None when this run builds (and prunes) it."""
    save_to: Optional[Path] = None
    """Where this run saves the start it builds (<run>/pruned)."""
    key: str = "model.path"
    """The flag or config key that named `folder`, for errors."""
    remedy: str = ""
    """What to do when `folder` turns out unusable, appended to errors."""

    @property
    def ref(self) -> Path:
        """The folder checkpoints store θ's edits against and the export compares with."""
        return self.folder if self.folder is not None else self.save_to


def plan_start(cfg: RunConfig, run: RunFolder, given: Optional[str | Path] = None) -> Start:
    """A folder given by the caller (compare: one pruned model for every method), the model.path
    that comes pruned (prune.method none), the <run>/pruned an earlier attempt of this run
    completed, or a start to build into <run>/pruned."""
    if given is not None:
        return Start(Path(given), key="--start-model")
    if cfg.prune.method == "none" and cfg.model.path:
        return Start(Path(cfg.model.path))
    if run.pruned.is_dir():  # renamed into place when complete (build_start)
        return Start(run.pruned, key="--resume", remedy=f"; remove {run.pruned} and resume again to "
                     "rebuild it (nothing else of the run is lost)")
    return Start(None, run.pruned)


def check_start(cfg: RunConfig, start: Start, run: RunFolder) -> None:
    """Every check of the starting model that needs no weights loaded, made before the run writes
    anything: the weight files are complete, the token lengths fit the context, seft.targets name
    Linear modules (of a skeleton on the meta device), an N:M pattern divides their inputs, and
    SEFT's K slots fit each matrix's nonzero budget B — known from prune.* when this run prunes,
    else counted in the starting folder's tensors (read once, one tensor at a time)."""
    source = start.folder if start.folder is not None else (
        Path(cfg.model.path) if cfg.model.path else None)
    if source is not None:
        try:
            check_weights(source, start.key)
        except ConfigError as e:
            raise ConfigError(f"{e}{start.remedy}") from None
    context, where = max_positions(source, cfg.model.tiny)
    cfg.check_context(context, where)
    try:
        model = skeleton(cfg.model, str(source) if source else None, cfg.model.tiny.vocab_size,
                         torch.float32, "sdpa")
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{start.key}: cannot build a causal LM from {source}: {e}{start.remedy}") from None
    targets = find_targets(model, cfg.seft.targets)
    built_here = start.folder is None or start.folder == run.pruned
    if built_here and cfg.prune.method != "none":
        check_shapes(targets, cfg.prune)
    if cfg.method != "seft":
        return
    key = "seft.lora_rank" if cfg.seft.lora_rank is not None else "seft.density"
    reader = None if built_here else SafetensorsFolder(source, start.key)
    p = cfg.prune
    for name, lin in targets:
        shape = (lin.out_features, lin.in_features)
        if reader is None:
            budget = kept_count(shape, p.sparsity, p.pattern, p.granularity) \
                if p.method != "none" else shape[0] * shape[1]
            why = f"prune.sparsity {p.sparsity:g}" if p.method != "none" else "the whole matrix"
        elif f"{name}.weight" in reader.where:
            budget, why = int((reader.get(f"{name}.weight") != 0).sum()), f"in {source}"
        else:  # named otherwise in the file: the method checks it on the loaded model
            continue
        capacity = slot_capacity(shape, cfg.seft)
        if capacity > budget:
            raise ConfigError(f"{key}: {name} ({shape[0]}x{shape[1]}) would get K={capacity} slots but "
                              f"has only {budget} nonzeros ({why}); lower {key}")


def start_tokenizer(cfg: RunConfig, start: Start, train_text: Optional[str]):
    """The tokenizer of the starting model, without its weights: the folder's, or the one the
    tiny model is built with (trained on the same text, so the same)."""
    path = start.folder or cfg.model.path
    if not path:
        return train_tokenizer(train_text, cfg.model.tiny.vocab_size)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{start.key}: no usable tokenizer in {path}: {e}{start.remedy}") from None


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
        os.replace(partial, save_to)
    backend.comm.wait("rank 0 pruning and saving the starting model")
    return model, tok


def find_start(run: RunFolder, cfg: RunConfig, recorded: Optional[str]) -> Path:
    """The starting model of a run being exported: its <run>/pruned, the start its checkpoint
    recorded, or its model.path — the first that is a model folder."""
    for p in (run.pruned, recorded, cfg.model.path):
        if p and Path(p, "config.json").is_file():
            return Path(p)
    raise ConfigError(f"the run's starting model ({recorded or cfg.model.path}) is gone; it is "
                      "needed because checkpoints store θ as edits of it")
