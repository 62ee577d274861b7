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
from tqdm import tqdm

from seft_scale.backends.base import Backend
from seft_scale.backends.local import LocalBackend
from seft_scale.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, write_text_atomic
from seft_scale.config import RunConfig, TrainConfig
from seft_scale.data import TokenSplit, batch_indices, build_data, tokenizer_training_text
from seft_scale.data.cache import tokenizer_fingerprint
from seft_scale.errors import ConfigError, RunStopped
from seft_scale.evaluate import stage_eval
from seft_scale.export import export_run
from seft_scale.methods import make_method
from seft_scale.metrics import MetricsLogger, format_record
from seft_scale.model import find_targets, has_weights
from seft_scale.plots import write_plots
from seft_scale.run import (RunFolder, build_start, check_start, on_rank0, plan_start, settle_resume,
                            start_tokenizer)
from seft_scale.sparsity import nm_valid

CHECKPOINT_README = """\
# SEFT checkpoints

Each step_*/ holds SEFT's own state: per-rank slots-rank*.safetensors (slots, deltas, optimizer
state, support mask and the edits of the frozen weights, keyed by matrix name and global flat
offset, so any number of ranks can load them) and trainer.json, on top of the run's starting model
(<run>/pruned, or the model.path it was given). They are not DeepSpeed engine checkpoints and hold
no full model: DeepSpeed's zero_to_fp32.py stops on them ("can't find *_model_states.pt files").

The repaired model (weights + sparse deltas, exact sparsity, a plain Hugging Face folder):
  <run>/export/                              written at the end of training
  seft-export --run <run>                    from the latest checkpoint, on one process
  seft-train ... --resume                    finishes the run (any number of ranks) and exports
"""


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine / linear decay to lr·min_lr_ratio at the last step."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    frac = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1 - frac
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * decay)


@torch.no_grad()
def heldout_loss(model, backend: Backend, split: TokenSplit, batch_size: int,
                 max_batches: int) -> Optional[float]:
    """Mean token loss over the first max_batches validation batches (split over ranks)."""
    n = min(len(split), batch_size * max_batches)
    if n == 0:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for first in range(0, n, batch_size * backend.world):
        # every rank runs every round (sharded forwards are collectives); past the end, on a
        # stand-in batch that is not counted
        start = first + backend.rank * batch_size
        batch = split.batch(torch.arange(start, min(start + batch_size, n)) if start < n
                            else torch.arange(1), backend.device)
        loss = model(**batch).loss
        if start < n:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += torch.tensor([float(loss) * tokens, tokens], dtype=torch.float64)
    total = backend.comm.allreduce(total)
    return float(total[0] / total[1])


def _stopped(what: str, step: int, cfg: RunConfig, out: Path) -> RunStopped:
    """The error of a run that diverged: `what` happened at `step`."""
    kept = latest_checkpoint(out)
    where = f"its checkpoints up to {kept} are kept" if kept is not None else "it has no checkpoint yet"
    return RunStopped(
        f"train: {what} at step {step}; the run stopped, {where}, and nothing was exported. Lower "
        f"train.lr (now {cfg.train.lr:g}), raise train.warmup_steps or lower train.max_grad_norm, "
        "and start a new --output-dir (a --resume repeats the same steps)")


def train(cfg: RunConfig, output_dir: str | Path, resume: bool = False,
          backend: Optional[Backend] = None, progress: bool = True,
          start_model: Optional[str | Path] = None) -> dict:
    """Run (or resume) one repair run; returns the summary that is also written to report.json.

    `start_model`: an HF folder holding the already pruned starting model to use instead of
    building / pruning it (compare: every method starts from the same pruned model; cfg.prune
    still names the pruner, which lora_star re-prunes with).

    Nothing is written until every check that needs no weights has passed: the output folder,
    the data (read and tokenised), the starting model's files, shape, targets, context and SEFT
    budget. A loss or gradient that stops being finite stops the run (RunStopped) before the
    optimizer applies it: the checkpoints stay as they were and nothing is exported. (Skipping
    such steps, as DeepSpeed's fp16 loss scaler does, is not offered: in fp32 / bf16 there is no
    loss scale to lower, a non-finite loss means the run diverged, and SEFT's selection window has
    already summed that step's dense gradient by the time the loss is known.)"""
    backend = backend or LocalBackend()
    comm, main = backend.comm, backend.rank == 0
    run = RunFolder(output_dir)
    out = run.root
    point = run.prepare(cfg, resume)  # every rank reads the folder; nobody writes yet
    if resume and (done := run.finished_summary()) is not None:
        if main:
            print(f"--resume: {out} is finished (report.json, {run.export}); nothing to do. Start "
                  "a new --output-dir to train again")
        return done
    t_cfg = cfg.train
    nm = cfg.prune.nm
    evaluating = bool(cfg.eval.ppl_data or cfg.eval.tasks)
    if evaluating and backend.world > 1:
        raise ConfigError("eval: in-run evaluation runs on one process; evaluate the export of a "
                          "sharded run with seft-eval")
    text = tokenizer_training_text(cfg.data)
    start = plan_start(cfg, run, start_model)
    on_rank0(comm, "rank 0 checking the starting model", lambda: check_start(cfg, start, run))
    data_tok = start_tokenizer(cfg, start, text)
    blocks = build_data(cfg.data, data_tok)
    comm.wait("every rank reading the data")

    # -- the first write: every rank has checked the folder, the data and the starting model
    if main:
        run.write_config(cfg)
        if resume:
            settle_resume(point, run)
    comm.barrier()
    ckpt = point.checkpoint if point is not None else None
    torch.manual_seed(t_cfg.seed)
    evals: dict = json.loads(run.eval_start.read_text()) if resume and run.eval_start.is_file() else {}

    # -- the starting sparse model: a folder, or built and pruned here (saved as <out>/pruned)
    if start.folder is not None:
        model, tok = backend.load_model(cfg.model, path=str(start.folder))
    else:
        model, tok = build_start(cfg, backend, start.save_to, text, evals if evaluating else None)
    if tokenizer_fingerprint(tok) != tokenizer_fingerprint(data_tok):  # never, unless files changed
        blocks = build_data(cfg.data, tok)
    if nm is not None and has_weights(model):
        bad = [n for n, lin in find_targets(model, cfg.seft.targets) if not nm_valid(lin.weight, *nm)]
        if bad:
            raise ConfigError(f"prune.pattern: {cfg.prune.pattern} does not hold in {bad[:3]}"
                              f"{' ...' if len(bad) > 3 else ''} of the model")
    if evaluating and "pruned" not in evals:
        evals["pruned"] = stage_eval(model, tok, cfg, "pruned")
        if main:
            write_text_atomic(run.eval_start, json.dumps(evals, indent=1))

    model = backend.wrap(model)
    method = make_method(cfg, backend, model, find_targets(model, cfg.seft.targets), tok)
    if t_cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # from_pretrained returns eval mode; held-out evaluation switches back itself
    total_steps = t_cfg.steps if cfg.method != "none" else 0

    step, tokens_seen, elapsed = 0, 0, 0.0
    last: dict = {}
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        if state["world_size"] != backend.world and main:
            print(f"resharding {ckpt} from {state['world_size']} to {backend.world} ranks; the data "
                  "order continues with the new world's batch layout")
        method.load(ckpt)
        step, tokens_seen, elapsed = state["step"], state["tokens_seen"], state["elapsed_s"]
        last = {"loss": state["loss"]} if state.get("loss") is not None else {}
        torch.set_rng_state(torch.tensor(state["rng"], dtype=torch.uint8))
        if main:
            print(f"resuming from {ckpt} at step {step}")
    else:
        method.init_state()

    logger = MetricsLogger(out, resume_step=step, enabled=main)
    bar = tqdm(total=total_steps, initial=step, disable=not (main and progress) or not total_steps,
               desc=cfg.method, dynamic_ncols=True)
    scale = 1.0 / (t_cfg.grad_accum * backend.world)
    while step < total_steps:
        step += 1
        t0 = time.perf_counter()
        rec = method.before_step(step)
        losses = []
        for micro in range(t_cfg.grad_accum):
            idx = batch_indices(len(blocks.train), (step - 1) * t_cfg.grad_accum + micro,
                                t_cfg.micro_batch_size, cfg.data.seed, backend.rank, backend.world)
            with comm.guard("a forward/backward pass"):
                loss = model(**blocks.train.batch(idx, backend.device)).loss
                (loss * scale).backward()
            losses.append(loss.detach())
        # every rank decides alike, before the optimizer (and SEFT's topology update) uses it
        loss_sum = float(comm.allreduce(torch.stack(losses).mean().to(torch.float64).reshape(1)))
        if not math.isfinite(loss_sum):
            raise _stopped(f"the loss is {loss_sum / backend.world}", step, cfg, out)
        lr = lr_at(step, t_cfg)
        rec.update(method.after_backward(step, lr))
        if not math.isfinite(rec.get("grad_norm", 0.0)):
            raise _stopped(f"the gradient norm is {rec['grad_norm']}", step, cfg, out)
        if t_cfg.check_invariants:
            method.check()

        support, trainable = method.local_counts()
        counts = comm.allreduce(torch.tensor([support, trainable], dtype=torch.float64))
        dt = time.perf_counter() - t0
        elapsed += dt
        step_tokens = t_cfg.grad_accum * t_cfg.micro_batch_size * cfg.data.seq_len * backend.world
        tokens_seen += step_tokens
        last = dict(step=step, loss=loss_sum / backend.world, lr=lr,
                    tokens_per_s=step_tokens / dt, step_time_s=dt,
                    density=float(counts[0]) / method.numel, trainable=int(counts[1]), **rec)
        logger.log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.3f}")
        if main and progress and (step % t_cfg.log_every == 0 or rec.get("grown")):
            bar.write(format_record(last))
        if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or step == total_steps:
            tensors = method.state_tensors()
            bad = sum(not bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
            if float(comm.allreduce(torch.tensor([float(bad)], dtype=torch.float64))):
                raise _stopped("the trained state holds non-finite values", step, cfg, out)
            state = {"tokens_seen": tokens_seen, "elapsed_s": elapsed, "loss": last["loss"],
                     "start_model": str(start.ref.resolve()), "rng": torch.get_rng_state().tolist()}
            ckpt_dir = save_checkpoint(out, step, tensors, state, backend.rank, backend.world,
                                       lambda: comm.wait("every rank writing its checkpoint file"),
                                       t_cfg.keep_checkpoints)
            if main:  # users of DeepSpeed reach for zero_to_fp32.py: say what these files are
                (ckpt_dir.parent / "README.md").write_text(CHECKPOINT_README)
    bar.close()
    method.finish()

    # the merge leaves a plain model computing what training computed (LoRA*'s re-prune changes
    # it): the held-out loss is measured on what is exported
    per_matrix = method.merge(start.ref)
    val_loss = heldout_loss(model, backend, blocks.val, t_cfg.micro_batch_size, t_cfg.eval_batches) \
        if t_cfg.eval_batches else None
    if val_loss is not None and not math.isfinite(val_loss):
        raise _stopped(f"the held-out loss of the merged model is {val_loss}", step, cfg, out)
    summary = {"method": cfg.method, "steps": step, "tokens_seen": tokens_seen,
               "train_time_s": round(elapsed, 3), "final_loss": last.get("loss"),
               "val_loss": val_loss, "val_ppl": math.exp(val_loss) if val_loss is not None else None}
    if evaluating and main:
        evals["repaired"] = stage_eval(model, tok, cfg, "repaired")
        summary["eval"] = {k: v for k, v in evals.items() if v is not None}
    summary = export_run(model, tok, per_matrix, backend, run.export, run.report, summary)
    if main and cfg.eval.plots:
        write_plots(out)
    logger.close()
    comm.wait("rank 0 writing the report and plots")
    return summary
