"""The training loop: one loop for every repair method and every backend.

step t = 1..T:  before_step (SEFT: selection window on/off) -> micro-batches forward/backward
                -> after_backward (reduce over ranks, clip, optimizer; SEFT: drop/grow/adapt every
                ΔT; static: mask re-applied) -> metrics, checkpoint.
Then: held-out loss, merge and export (plain HF folder + report.json), evaluation, plots.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from seft_scale.backends import Backend
from seft_scale.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from seft_scale.config import ConfigError, RunConfig, TrainConfig, to_dict
from seft_scale.data import TokenSplit, batch_indices, build_data, tokenizer_training_text
from seft_scale.export import export_run
from seft_scale.methods import make_method
from seft_scale.metrics import MetricsLogger, format_record
from seft_scale.model import find_targets, save_model
from seft_scale.prune import prune_model
from seft_scale.sparsity.nm import parse_pattern

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
                "train.check_invariants", "train.activation_checkpointing", "data.cache_dir"}


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine / linear decay to lr·min_lr_ratio at the last step."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    frac = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1 - frac
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * decay)


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
    backend.model.eval()
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


def stage_eval(model, tok, cfg: RunConfig, stage: str, nm) -> Optional[dict]:
    """Perplexity (and, for the repaired model, lm-eval tasks) of one stage, if asked for."""
    from seft_scale.evaluate import evaluate_model, read_ppl_texts
    e = cfg.eval
    texts = read_ppl_texts(e.ppl_data) if e.ppl_data and stage in e.stages else None
    tasks = e.tasks if stage == "repaired" else []
    if texts is None and not tasks:
        return None
    res = evaluate_model(model, tok, texts, e.seqlen, tasks=tasks, include_path=e.include_path,
                         limit=e.limit, max_windows=e.max_windows, targets=cfg.seft.targets, nm=nm)
    if "perplexity" in res:
        print(f"[{stage}] held-out perplexity {res['perplexity']['ppl']:.3f} (seqlen "
              f"{e.seqlen}, {res['perplexity']['windows']} windows), sparsity "
              f"{res['sparsity']['summary']['sparsity']:.4f}")
    return res


def train(cfg: RunConfig, output_dir: str | Path, resume: bool = False,
          backend: Optional[Backend] = None, progress: bool = True,
          start_model: Optional[str | Path] = None) -> dict:
    """Run (or resume) one repair run; returns the summary that is also written to report.json.

    `start_model`: an HF folder holding the already pruned starting model to use instead of
    building / pruning it (launch/compare.py: every method starts from the same pruned model;
    cfg.prune still names the pruner, which lora_star re-prunes with)."""
    if backend is None:
        from seft_scale.backends.local import LocalBackend
        backend = LocalBackend()
    out, main = Path(output_dir), backend.rank == 0
    ckpt = prepare_output(out, cfg, resume)
    barrier = backend.barrier
    barrier()  # every rank has checked the output folder before rank 0 writes into it
    t_cfg = cfg.train
    nm = parse_pattern(cfg.prune.pattern)
    evaluating = bool(cfg.eval.ppl_data or cfg.eval.tasks)
    if evaluating and backend.world > 1:
        raise ConfigError("eval: in-run evaluation runs on one process; evaluate the export of a "
                          "sharded run with launch/evaluate.py")
    text = tokenizer_training_text(cfg.data)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    torch.manual_seed(t_cfg.seed)
    evals: dict = json.loads((out / "eval_start.json").read_text()) \
        if resume and (out / "eval_start.json").is_file() else {}

    # -- the starting sparse model: built/pruned here (saved as <out>/pruned) or brought by the user
    start_dir = Path(start_model) if start_model else out / "pruned"
    builds_start = not start_model and (cfg.prune.method != "none" or not cfg.model.path)
    if start_model or (builds_start and (start_dir / "config.json").is_file()):
        model, tok = backend.load_model(cfg.model, path=str(start_dir))
    else:
        model, tok = backend.load_model(cfg.model, train_text=text)
        if evaluating and "dense" not in evals:
            evals["dense"] = stage_eval(model, tok, cfg, "dense", None)
        if cfg.prune.method != "none" and not on_meta(model):
            prune_model(model, tok, find_targets(model, cfg.seft.targets), cfg.prune, backend.device)
        if builds_start and main:
            save_model(model, tok, start_dir)
        barrier()
    start_ref = start_dir if (start_model or builds_start) else Path(cfg.model.path)
    targets = find_targets(model, cfg.seft.targets)
    if nm is not None and not on_meta(model):
        from seft_scale.sparsity.nm import nm_valid
        bad = [n for n, lin in targets if not nm_valid(lin.weight, *nm)]
        if bad:
            raise ConfigError(f"prune.pattern: {cfg.prune.pattern} does not hold in {bad[:3]}"
                              f"{' ...' if len(bad) > 3 else ''} of the model")
    if evaluating and "pruned" not in evals:
        evals["pruned"] = stage_eval(model, tok, cfg, "pruned", nm)
        if main:
            (out / "eval_start.json").write_text(json.dumps(evals, indent=1))

    blocks = build_data(cfg.data, tok)
    method = make_method(cfg, backend, model, targets, tok, nm)
    if t_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # from_pretrained returns eval mode; held-out evaluation switches back itself
    total_steps = t_cfg.steps if cfg.method != "none" else 0

    step, tokens_seen, elapsed = 0, 0, 0.0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        if state["world_size"] != backend.world and main:
            print(f"resharding {ckpt} from {state['world_size']} to {backend.world} ranks; the data "
                  "order continues with the new world's batch layout")
        method.load(ckpt)
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        if main:
            print(f"resuming from {ckpt} at step {step}")
    else:
        method.init_state()

    logger = MetricsLogger(out, resume_step=step, enabled=main)
    bar = tqdm(total=total_steps, initial=step, disable=not (main and progress) or not total_steps,
               desc=cfg.method, dynamic_ncols=True)
    scale = 1.0 / (t_cfg.grad_accum * backend.world)
    last: dict = {}
    while step < total_steps:
        step += 1
        t0 = time.perf_counter()
        rec = method.before_step(step)
        losses = []
        for micro in range(t_cfg.grad_accum):
            idx = batch_indices(len(blocks.train), (step - 1) * t_cfg.grad_accum + micro,
                                t_cfg.micro_batch_size, cfg.data.seed, backend.rank, backend.world)
            losses.append(backend.forward_backward(blocks.train.batch(idx, backend.device), scale))
        lr = lr_at(step, t_cfg)
        rec.update(method.after_backward(step, lr))
        if t_cfg.check_invariants:
            method.check()

        support, trainable = method.local_counts()
        both = torch.tensor([float(torch.stack(losses).mean()), support, trainable], dtype=torch.float64)
        if backend.allreduce is not None:
            both = backend.allreduce(both)
        dt = time.perf_counter() - t0
        elapsed += dt
        step_tokens = t_cfg.grad_accum * t_cfg.micro_batch_size * cfg.data.seq_len * backend.world
        tokens_seen += step_tokens
        last = dict(step=step, loss=float(both[0]) / backend.world, lr=lr,
                    tokens_per_s=step_tokens / dt, step_time_s=dt,
                    density=float(both[1]) / method.numel, trainable=int(both[2]), **rec)
        logger.log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if main and progress and (step % t_cfg.log_every == 0 or rec.get("grown")):
            bar.write(format_record(last))
        if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or step == total_steps:
            state = {"tokens_seen": tokens_seen, "elapsed_s": elapsed, "start_model": str(start_ref.resolve()),
                     "rng": torch.get_rng_state().tolist()}
            ckpt_dir = save_checkpoint(out, step, method.state_tensors(), state, backend.rank,
                                       backend.world, barrier, t_cfg.keep_checkpoints)
            if main:  # users of DeepSpeed reach for zero_to_fp32.py: say what these files are
                (ckpt_dir.parent / "README.md").write_text(CHECKPOINT_README)
    bar.close()
    method.finish()

    def measure() -> Optional[float]:
        return heldout_loss(backend, blocks.val, t_cfg.micro_batch_size, t_cfg.eval_batches) \
            if t_cfg.eval_batches else None

    # the held-out loss of what is exported: before the merge where merging keeps the function
    # (and sharded backends still hold the training model), after it where it does not (LoRA*)
    val_loss = None if method.merge_changes_function else measure()
    export_model = backend.export_model(model, start_ref)
    per_matrix = method.merge(export_model, start_ref, nm)
    if method.merge_changes_function:
        val_loss = measure()
    summary = {"method": cfg.method, "steps": step, "tokens_seen": tokens_seen,
               "train_time_s": round(elapsed, 3), "final_loss": last.get("loss"),
               "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None}
    if evaluating and main:
        evals["repaired"] = stage_eval(export_model, tok, cfg, "repaired", nm)
        summary["eval"] = {k: v for k, v in evals.items() if v is not None}
    summary = export_run(export_model, tok, per_matrix, backend, out / "export",
                         out / "report.json", summary)
    if main and cfg.eval.plots:
        from seft_scale.plots import write_plots
        write_plots(out)
    logger.close()
    barrier()
    return summary
