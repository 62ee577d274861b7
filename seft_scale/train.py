"""The SEFT training loop: one loop for every backend.

step t = 1..T:  micro-batches -> δ-grads (dense G too inside a selection window)
                -> reduce over ranks -> clip -> slot AdamW -> every ΔT: drop/grow/adapt
                -> metrics, checkpoint.
Then: held-out loss, export (merged HF folder + report.json).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from seft_scale.backends import Backend
from seft_scale.checkpoint import latest_checkpoint, load_deltas, load_trainer_state, save_checkpoint
from seft_scale.config import ConfigError, RunConfig, TrainConfig, to_dict
from seft_scale.data import TokenSplit, batch_indices, build_data, tokenizer_training_text
from seft_scale.delta import SparseDelta, choose_kernel
from seft_scale.export import export_run
from seft_scale.metrics import MetricsLogger, format_record
from seft_scale.model import find_targets, save_model
from seft_scale.optim import SlotAdamW, clip_slot_grads
from seft_scale.prune import prune_model
from seft_scale.sparsity.nm import parse_pattern
from seft_scale.sparsity.schedule import drop_fraction, in_window, is_update_step
from seft_scale.sparsity.topology import check_budget, init_slots, topology_update

CHECKPOINT_README = """\
# SEFT checkpoints

Each step_*/ holds SEFT's own state: per-rank slots-rank*.safetensors (slots, deltas, optimizer
state, support mask and the edits of the frozen weights, keyed by matrix name and global flat
offset, so any number of ranks can load them) and trainer.json, on top of the run's starting model
(<run>/pruned, or the model.path it was given). They are not DeepSpeed engine checkpoints and hold
no full model: DeepSpeed's zero_to_fp32.py stops on them ("can't find *_model_states.pt files").

The repaired model (weights + sparse deltas, exact sparsity, a plain Hugging Face folder):
  <run>/export/                              written at the end of training
  python launch/export.py --run <run>        from the latest checkpoint, on one process
  launch/train.py ... --resume               finishes the run (any number of ranks) and exports
"""

# Keys that may differ between a run and its resumption (they do not change the result).
_RESUME_FREE = {"train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
                "train.check_invariants"}


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine / linear decay to lr·min_lr_ratio at the last step."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    frac = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1 - frac
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * decay)


def slot_capacity(shape: tuple[int, int], cfg) -> int:
    """K: a LoRA-rank match r·(d_in + d_out), or density·n."""
    d_out, d_in = shape
    if cfg.lora_rank is not None:
        return min(cfg.lora_rank * (d_in + d_out), d_in * d_out)
    return max(1, int(cfg.density * d_in * d_out))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def prepare_output(out: Path, cfg: RunConfig, resume: bool) -> Optional[Path]:
    """Check the output folder before any heavy work; returns the checkpoint to resume from."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir: {out} exists and is not a folder")
    saved = out / "config.yaml"
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--output-dir: {out} is not empty; pass --resume to continue the "
                              "run in it, or choose a new folder (nothing was changed)")
        return None
    if not saved.is_file():
        raise ConfigError(f"--resume: {out} holds no run (no config.yaml)")
    old = _flatten(yaml.safe_load(saved.read_text()))
    new = _flatten(to_dict(cfg))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUME_FREE)
    if changed:
        raise ConfigError("--resume: the config differs from the run's saved config.yaml in "
                          + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed))
    return latest_checkpoint(out)


@torch.no_grad()
def heldout_loss(backend: Backend, split: TokenSplit, batch_size: int, max_batches: int) -> Optional[float]:
    """Mean token loss over the first max_batches validation batches (split over ranks)."""
    n = min(len(split), batch_size * max_batches)
    if n == 0:
        return None
    total = torch.zeros(2, dtype=torch.float64)
    for first in range(0, n, batch_size * backend.world):
        # every rank runs every round (sharded forwards are collectives); past the end, on a
        # stand-in batch that is not counted
        start = first + backend.rank * batch_size
        batch = split.batch(torch.arange(start, min(start + batch_size, n)) if start < n
                            else torch.arange(1), backend.device)
        loss = backend.model(**batch).loss
        if start < n:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
    if backend.allreduce is not None:
        total = backend.allreduce(total)
    return float(total[0] / total[1])


def on_meta(model) -> bool:
    """Whether this rank got only a meta-device skeleton of the model (a sharding backend may build
    the weights on rank 0 alone and fill the shards in attach): pruning and weight checks run
    where the weights are."""
    # numel 0: ZeRO-3 partitioned parameters hold no data between gathers
    return any(p.is_meta or p.numel() == 0 for p in model.parameters())


def attach_seft(backend: Backend, model, targets, s_cfg) -> list[SparseDelta]:
    """SparseDeltas over this rank's shards of the targets, with budgets B (the nonzeros of the
    starting model, over all ranks) and slot capacities K; no slots placed yet."""
    kernel_for = (lambda shape: s_cfg.kernel) if s_cfg.kernel != "auto" else (
        lambda shape: choose_kernel(slot_capacity(shape, s_cfg), shape[0] * shape[1],
                                    s_cfg.gather_cost_ratio))
    deltas: list[SparseDelta] = backend.attach(model, targets, kernel_for)
    counts = torch.tensor([int(d.mask.sum()) for d in deltas], dtype=torch.int64)
    if backend.allreduce is not None:
        counts = backend.allreduce(counts)
    for d, b in zip(deltas, counts.tolist()):
        d.budget, d.capacity = b, slot_capacity(d.shape, s_cfg)
        if d.capacity > d.budget:
            key = "seft.lora_rank" if s_cfg.lora_rank is not None else "seft.density"
            raise ConfigError(f"{key}: {d.name} would get K={d.capacity} slots but has only "
                              f"{d.budget} nonzeros; lower {key}")
    return deltas


def train(cfg: RunConfig, output_dir: str | Path, resume: bool = False,
          backend: Optional[Backend] = None, progress: bool = True) -> dict:
    """Run (or resume) one SEFT run; returns the summary that is also written to report.json."""
    if backend is None:
        from seft_scale.backends.local import LocalBackend
        backend = LocalBackend()
    out, main = Path(output_dir), backend.rank == 0
    ckpt = prepare_output(out, cfg, resume)
    barrier = backend.barrier
    barrier()  # every rank has checked the output folder before rank 0 writes into it
    t_cfg, s_cfg = cfg.train, cfg.seft
    nm = parse_pattern(cfg.prune.pattern)
    text = tokenizer_training_text(cfg.data)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(t_cfg.seed)

    # -- the starting sparse model: built/pruned here (saved as <out>/pruned) or brought by the user
    start_dir = out / "pruned"
    builds_start = cfg.prune.method != "none" or not cfg.model.path
    if builds_start and (start_dir / "config.json").is_file():
        model, tok = backend.load_model(cfg.model, path=str(start_dir))
    else:
        model, tok = backend.load_model(cfg.model, train_text=text)
        if cfg.prune.method != "none" and not on_meta(model):
            prune_model(model, tok, find_targets(model, s_cfg.targets), cfg.prune, backend.device)
        if builds_start and main:
            save_model(model, tok, start_dir)
        barrier()
    start_ref = start_dir if builds_start else Path(cfg.model.path)
    targets = find_targets(model, s_cfg.targets)
    if nm is not None and not on_meta(model):
        from seft_scale.sparsity.nm import nm_valid
        bad = [n for n, lin in targets if not nm_valid(lin.weight, *nm)]
        if bad:
            raise ConfigError(f"prune.pattern: {cfg.prune.pattern} does not hold in {bad[:3]}"
                              f"{' ...' if len(bad) > 3 else ''} of the model")

    blocks = build_data(cfg.data, tok)

    deltas = attach_seft(backend, model, targets, s_cfg)
    opt = SlotAdamW(t_cfg.lr, (t_cfg.beta1, t_cfg.beta2), t_cfg.eps, t_cfg.weight_decay)
    numel = sum(d.numel for d in deltas)

    step, tokens_seen, elapsed = 0, 0, 0.0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        if state["world_size"] != backend.world and main:
            print(f"resharding {ckpt} from {state['world_size']} to {backend.world} ranks; the data "
                  "order continues with the new world's batch layout")
        load_deltas(ckpt, deltas)
        backend.base_changed(deltas)
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        if main:
            print(f"resuming from {ckpt} at step {step}")
    else:
        init_slots(deltas, s_cfg.init_seed, lambda g: opt.seed(g, 0), backend.allreduce)

    logger = MetricsLogger(out, resume_step=step, enabled=main)
    bar = tqdm(total=t_cfg.steps, initial=step, disable=not (main and progress), desc="seft",
               dynamic_ncols=True)
    scale = 1.0 / (t_cfg.grad_accum * backend.world)
    last = {}
    while step < t_cfg.steps:
        step += 1
        t0 = time.perf_counter()
        window = in_window(step, s_cfg.update_interval, s_cfg.window, t_cfg.steps)
        backend.set_dense_grad_capture(deltas, window)
        losses = []
        for micro in range(t_cfg.grad_accum):
            idx = batch_indices(len(blocks.train), (step - 1) * t_cfg.grad_accum + micro,
                                t_cfg.micro_batch_size, cfg.data.seed, backend.rank, backend.world)
            losses.append(backend.forward_backward(blocks.train.batch(idx, backend.device), scale))
        backend.reduce_slot_grads(deltas)
        grad_norm = clip_slot_grads(deltas, t_cfg.max_grad_norm, backend.allreduce)
        lr = lr_at(step, t_cfg)
        opt.step(deltas, lr)
        rec = {"dropped": 0, "grown": 0, "reactivated": 0, "adapt_pruned": 0}
        if is_update_step(step, s_cfg.update_interval, t_cfg.steps):
            backend.set_dense_grad_capture(deltas, False)
            p = drop_fraction(step, t_cfg.steps, s_cfg.drop_rate, s_cfg.drop_schedule)
            stats = topology_update(
                deltas, p, s_cfg.window, lambda g: opt.seed(g, s_cfg.window),
                merge_dropped=s_cfg.merge_dropped, reactivation=s_cfg.reactivation,
                nm=nm is not None, criterion=s_cfg.adapt_criterion, allreduce=backend.allreduce)
            backend.base_changed(deltas)
            rec.update(stats.totals(), drop_fraction=p)
        if t_cfg.check_invariants:
            check_budget(deltas, backend.allreduce, nm)

        loss = torch.stack(losses).mean().reshape(1).to(torch.float64)
        stats_t = torch.tensor([int(d.mask.sum()) for d in deltas] + [len(d.pos) for d in deltas],
                               dtype=torch.float64)
        both = torch.cat([loss.cpu(), stats_t])
        if backend.allreduce is not None:
            both = backend.allreduce(both)
        support, slots = both[1:1 + len(deltas)].sum(), both[1 + len(deltas):].sum()
        dt = time.perf_counter() - t0
        elapsed += dt
        step_tokens = t_cfg.grad_accum * t_cfg.micro_batch_size * cfg.data.seq_len * backend.world
        tokens_seen += step_tokens
        last = dict(step=step, loss=float(both[0]) / backend.world, lr=lr, grad_norm=grad_norm,
                    tokens_per_s=step_tokens / dt, step_time_s=dt, density=float(support) / numel,
                    slots=int(slots), window=window, **rec)
        logger.log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if main and progress and (step % t_cfg.log_every == 0 or rec["grown"]):
            bar.write(format_record(last))
        if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or step == t_cfg.steps:
            state = {"tokens_seen": tokens_seen, "elapsed_s": elapsed,
                     "rng": torch.get_rng_state().tolist()}
            ckpt_dir = save_checkpoint(out, step, deltas, state, backend.rank, backend.world,
                                       barrier, t_cfg.keep_checkpoints)
            if main:  # users of DeepSpeed reach for zero_to_fp32.py: say what these files are
                (ckpt_dir.parent / "README.md").write_text(CHECKPOINT_README)
    bar.close()
    backend.set_dense_grad_capture(deltas, False)
    check_budget(deltas, backend.allreduce, nm)

    val_loss = heldout_loss(backend, blocks.val, t_cfg.micro_batch_size, t_cfg.eval_batches) \
        if t_cfg.eval_batches else None
    summary = {"steps": step, "tokens_seen": tokens_seen, "train_time_s": round(elapsed, 3),
               "final_loss": last.get("loss"), "val_loss": val_loss,
               "val_ppl": math.exp(val_loss) if val_loss is not None else None}
    summary = export_run(backend.export_model(model, start_ref), tok, deltas, backend,
                         out / "export", out / "report.json", start_ref, nm, summary)
    logger.close()
    barrier()
    return summary
