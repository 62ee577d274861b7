"""Evaluation the way pruning papers report it: perplexity, lm-eval tasks, exact sparsity.

- `perplexity`: the Wanda/SparseGPT protocol. The texts are joined with "\\n\\n" and tokenised
  once; the ids are cut into non-overlapping windows of `seqlen` (the remainder is dropped);
  each window's mean next-token loss is weighted by seqlen, so ppl = exp(Σ_w loss_w·seqlen /
  (n_windows·seqlen)), exactly as their `eval_ppl` computes it.
- `run_lm_eval`: lm-eval-harness tasks on the in-memory model (`HFLM(pretrained=model)`), by
  name from lm-eval's registry or from local task YAMLs (`include_path`); datasets are loaded
  before any model work, so a task needing an unreachable hub fails first, by name.
- `sparsity_report`: per target matrix shape, nonzeros, sparsity (and N:M validity) of an HF
  folder (read one tensor at a time) or of an in-memory model.

`evaluate_model` runs all three on an in-memory model; `stage_eval` is what a run measures at its
stages (dense, pruned, repaired); seft-eval (launch/evaluate.py) does the same for a saved folder.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence
from unittest import mock

import torch
import torch.nn.functional as F

from seft_scale.errors import ConfigError
from seft_scale.model import SafetensorsFolder, find_targets
from seft_scale.sparsity import matrix_report, summarize

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------------ perplexity

def read_ppl_texts(path: str | Path) -> list[str]:
    """The texts of a .txt file (one text) or a .json/.jsonl file of {"text": ...} records."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ppl-data: {path} does not exist")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--ppl-data: {path} is not UTF-8 text ({e})") from None
    if p.suffix not in (".json", ".jsonl"):
        return [raw]
    try:
        records = (json.loads(raw) if p.suffix == ".json"
                   else [json.loads(line) for line in raw.splitlines() if line.strip()])
        return [r["text"] for r in records]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"--ppl-data: {path} must hold records with a 'text' field ({e!r})") from None


def ppl_windows(tokenizer, texts: Sequence[str], seqlen: int,
                max_windows: Optional[int] = None) -> tuple[torch.Tensor, int]:
    """(windows [n, seqlen], total tokens): texts joined by "\\n\\n", tokenised once with the
    tokenizer's defaults (as Wanda does), cut into non-overlapping windows, remainder dropped."""
    if seqlen < 2:
        raise ConfigError(f"--seqlen: {seqlen} is too short (need at least 2 tokens per window)")
    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.int64)
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"--ppl-data: {len(ids)} tokens make no window of --seqlen {seqlen}")
    return ids[: n * seqlen].view(n, seqlen), len(ids)


def perplexity(model, tokenizer, texts: Sequence[str], seqlen: int, batch_size: int = 1,
               max_windows: Optional[int] = None) -> dict:
    """Wanda/SparseGPT perplexity of `texts` at `seqlen` (the first `max_windows` windows only,
    as their C4 evaluation does with 256, when given)."""
    return windows_perplexity(model, *ppl_windows(tokenizer, texts, seqlen, max_windows), batch_size)


@torch.no_grad()
def windows_perplexity(model, windows: torch.Tensor, total_tokens: int, batch_size: int = 1) -> dict:
    """Perplexity over token windows [n, seqlen]; memory is one batch of windows and its logits."""
    device = next(model.parameters()).device
    was_training, t0 = model.training, time.perf_counter()
    model.eval()
    n, seqlen = windows.shape
    nll = torch.zeros((), dtype=torch.float64)
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1)
        nll += (loss.double() * seqlen).sum().cpu()
    model.train(was_training)
    mean = float(nll) / (n * seqlen)
    return {"seqlen": seqlen, "windows": n, "tokens": total_tokens,
            "unused_tokens": total_tokens - n * seqlen, "nll": mean, "ppl": math.exp(mean),
            "time_s": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------- lm-eval

def task_manager(names: Sequence[str], include_path: Optional[str | Path] = None):
    """A TaskManager that knows every name in `names`, or a ConfigError naming the unknown ones.

    Indexing lm-eval's ~15k built-in tasks takes ~8 s, so local YAMLs are tried alone first."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path: {include_path} is not a folder of lm-eval task YAMLs")
    inc = str(include_path) if include_path is not None else None
    if inc is not None:
        tm = TaskManager(include_path=inc, include_defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    tm = TaskManager(include_path=inc)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        where = f" or in {include_path}" if inc is not None else " (local YAMLs: --include-path DIR)"
        raise ConfigError(f"--tasks: unknown lm-eval task(s) {unknown}: not in lm-eval's registry{where}")
    return tm


def load_tasks(tasks: Sequence, include_path: Optional[str | Path] = None) -> list:
    """lm-eval Task/Group objects, datasets loaded, for task names (objects pass through).

    A dataset that cannot be loaded is an error naming the task; HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE are honoured by `datasets` itself."""
    names = [t for t in tasks if isinstance(t, str)]
    built = [t for t in tasks if not isinstance(t, str)]
    tm = task_manager(names, include_path) if names else None
    for name in names:
        try:
            loaded = tm.load(name)
        except (ConnectionError, OSError, ValueError) as e:
            raise ConfigError(
                f"--tasks: cannot load the dataset of lm-eval task {name!r}: {e}. Hub datasets need "
                "a reachable hub or a filled datasets cache; offline tasks go in --include-path") from None
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        built.extend([top] if top is not None else loaded["tasks"].values())  # a tag: its tasks
    return built


# Draws of lm-eval's bootstrap standard error for metrics without a closed form (perplexity and
# the like; acc's stderr is closed-form and unaffected). lm-eval's default is 100,000 draws in a
# fork()ed multiprocessing.Pool; forked from a process that holds torch's threads, a pool worker
# can block forever on a lock held at fork time (seen here: a test stuck for 11 minutes on a
# SemLock inside bootstrap_stderr). So the bootstrap runs in-process (lm-eval's DISABLE_MULTIPROC
# switch) with 1,000 draws: well under a second for a few hundred items.
BOOTSTRAP_ITERS = 1000


def run_lm_eval(model, tokenizer, tasks: Sequence, batch_size: int = 1, limit: Optional[int] = None,
                num_fewshot: Optional[int] = None) -> dict:
    """{task: {metric: value}} of lm-eval on the in-memory model; `tasks` from `load_tasks`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # DISABLE_MULTIPROC is read by lm_eval.api.metrics.bootstrap_stderr at call time; restored after
    with mock.patch.dict(os.environ, DISABLE_MULTIPROC="1"):
        # the tasks are loaded already: an empty TaskManager spares simple_evaluate re-indexing ~15k tasks
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=TaskManager(include_defaults=False),
                                      bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
                                      verbosity="WARNING")
    model.train(was_training)
    return {task: {k.removesuffix(",none"): v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in out["results"].items()}


# -------------------------------------------------------------------------------------- sparsity

def _target_regex(targets: Iterable[str]) -> re.Pattern:
    return re.compile(rf"(.+\.(?:{'|'.join(targets)}))\.weight")


def _layer_order(name: str) -> list:
    """Sort key putting model.layers.2 before model.layers.10."""
    return [(x.isdigit(), int(x) if x.isdigit() else x) for x in name.split(".")]


def folder_matrices(folder: str | Path,
                    targets: Sequence[str] = DEFAULT_TARGETS) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, weight) of the target matrices of an HF folder, one tensor in memory at a
    time; the folder and the targets are checked now, the tensors read lazily."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ConfigError(f"--model: {folder} has no safetensors weights (model.safetensors[.index.json])")
    st = SafetensorsFolder(folder)
    regex = _target_regex(targets)
    names = sorted(((m.group(1), k) for k in st.where if (m := regex.fullmatch(k))),
                   key=lambda nk: _layer_order(nk[0]))
    if not names:
        raise ConfigError(f"--targets: {list(targets)} match no weight in {folder}")
    return ((name, st.get(key)) for name, key in names)


def model_matrices(model, targets: Sequence[str] = DEFAULT_TARGETS) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, weight) of the target Linear modules of an in-memory model."""
    for name, lin in find_targets(model, list(targets)):
        yield name, lin.weight.detach()


def sparsity_report(matrices: Iterable[tuple[str, torch.Tensor]],
                    nm: Optional[tuple[int, int]] = None) -> dict:
    """{"summary": ..., "matrices": {name: {shape, nnz, density, sparsity[, nm_valid]}}}."""
    full = {}
    for name, w in matrices:
        nz = w != 0
        full[name] = matrix_report(w, nz, None, int(nz.sum()), nm)
    summary = summarize(full)
    no_budget = ("budget", "support", "exact_budget")  # a plain model has no training budget to check
    return {"summary": {k: v for k, v in summary.items() if k not in no_budget},
            "matrices": {n: {k: v for k, v in e.items() if k not in no_budget}
                         | {"sparsity": 1 - e["density"]} for n, e in full.items()}}


# ---------------------------------------------------------------------------------- all together

def evaluate_model(model, tokenizer, ppl_texts: Optional[Sequence[str] | dict[str, Sequence[str]]] = None,
                   seqlen: Optional[int] = None,
                   tasks: Sequence[str] = (), include_path: Optional[str | Path] = None,
                   limit: Optional[int] = None, batch_size: int = 1, max_windows: Optional[int] = None,
                   num_fewshot: Optional[int] = None, targets: Sequence[str] = DEFAULT_TARGETS,
                   nm: Optional[tuple[int, int]] = None,
                   matrices: Optional[Iterable[tuple[str, torch.Tensor]]] = None) -> dict:
    """Perplexity (when `ppl_texts`), lm-eval `tasks`, and the sparsity of the target matrices.

    `ppl_texts` is one held-out set (a list of texts) or several by name ({name: texts}), each
    its own perplexity: result["perplexity"] is the first set's, result["perplexity_texts"]
    {name: result} all of them. `seqlen` defaults to Wanda's choice, the model's context length (capped at 2048 here).
    `tasks` are lm-eval names or objects from `load_tasks`. Inputs are checked (tasks resolved and
    their datasets loaded, ppl texts tokenised) before any forward pass. `matrices` overrides where
    the sparsity is read (e.g. `folder_matrices` of the saved folder)."""
    max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
    seqlen = seqlen or min(2048, max_pos)
    if ppl_texts is not None and seqlen > max_pos:
        raise ConfigError(f"--seqlen: {seqlen} exceeds the model's max_position_embeddings {max_pos}")
    sets = ppl_texts if isinstance(ppl_texts, dict) or ppl_texts is None else {"ppl": ppl_texts}
    windows = {name: ppl_windows(tokenizer, texts, seqlen, max_windows)
               for name, texts in (sets or {}).items()}
    loaded = load_tasks(tasks, include_path) if tasks else []
    matrices = matrices if matrices is not None else model_matrices(model, targets)
    result = {"sparsity": sparsity_report(matrices, nm)}
    if windows:
        result["perplexity_texts"] = {name: windows_perplexity(model, *w, batch_size)
                                      for name, w in windows.items()}
        result["perplexity"] = next(iter(result["perplexity_texts"].values()))
    if loaded:
        t0 = time.perf_counter()
        result["lm_eval"] = run_lm_eval(model, tokenizer, loaded, batch_size, limit, num_fewshot)
        result["lm_eval_time_s"] = round(time.perf_counter() - t0, 3)
    return result


def stage_eval(model, tokenizer, cfg, stage: str) -> Optional[dict]:
    """Perplexity (and, for the repaired model, lm-eval tasks) of one stage of a run, as its
    eval section asks (cfg: the RunConfig); None when it asks for nothing at this stage. The
    dense stage is measured before pruning, so it checks no N:M pattern."""
    e = cfg.eval
    texts = ({name: read_ppl_texts(path) for name, path in e.ppl_sets().items()}
             if e.ppl_data and stage in e.stages else None)
    tasks = e.tasks if stage == "repaired" else []
    if texts is None and not tasks:
        return None
    res = evaluate_model(model, tokenizer, texts, e.seqlen, tasks=tasks, include_path=e.include_path,
                         limit=e.limit, max_windows=e.max_windows, targets=cfg.seft.targets,
                         nm=None if stage == "dense" else cfg.prune.nm)
    for name, p in res.get("perplexity_texts", {}).items():
        print(f"[{stage}] held-out perplexity {name} {p['ppl']:.3f} (seqlen {e.seqlen}, "
              f"{p['windows']} windows), sparsity {res['sparsity']['summary']['sparsity']:.4f}")
    return res


def parse_ppl_data(text: str) -> dict[str, str]:
    """--ppl-data of seft-eval: one path (named after its file), or name=path,name=path,..."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if len(items) == 1 and "=" not in items[0]:
        return {Path(items[0]).stem or "ppl": items[0]}
    out = {}
    for item in items:
        name, sep, path = (x.strip() for x in item.partition("="))
        if not sep or not name or not path:
            raise ConfigError(f"--ppl-data: {item!r} is not name=path (several texts: a=x.txt,b=y.txt)")
        if name in out:
            raise ConfigError(f"--ppl-data: the name {name!r} is given twice")
        out[name] = path
    return out


def format_results(result: dict) -> str:
    """A console table: perplexity, lm-eval metrics, and sparsity per matrix type."""
    lines = []
    for name, p in result.get("perplexity_texts", {}).items():
        lines.append(f"perplexity  {name:<12} ppl {p['ppl']:.4f}  (seqlen {p['seqlen']}: {p['windows']} "
                     f"windows = {p['windows'] * p['seqlen']} of {p['tokens']} tokens, {p['time_s']:.1f} s)")
    for task, metrics in result.get("lm_eval", {}).items():
        shown = [f"{k} {v:.4f}" + (f" ± {metrics[k + '_stderr']:.4f}" if k + "_stderr" in metrics else "")
                 for k, v in metrics.items() if not k.endswith("_stderr") and k != "sample_len"]
        shown.append(f"(n={metrics.get('sample_len', '?')})")
        lines.append(f"lm-eval     {task:<24} " + "  ".join(shown))
    s = result["sparsity"]
    by_kind: dict[str, list[int]] = {}
    for name, m in s["matrices"].items():
        acc = by_kind.setdefault(name.rsplit(".", 1)[-1], [0, 0, 0])
        acc[0] += 1
        acc[1] += m["nnz"]
        acc[2] += m["shape"][0] * m["shape"][1]
    order = {kind: i for i, kind in enumerate(DEFAULT_TARGETS)}
    for kind, (count, nnz, numel) in sorted(by_kind.items(), key=lambda kv: order.get(kv[0], len(order))):
        lines.append(f"sparsity    {kind:<10} {count:>4} matrices  nnz {nnz:>12}  "
                     f"sparsity {1 - nnz / numel:.4f}")
    sm = s["summary"]
    lines.append(f"sparsity    {'all':<10} {sm['matrices']:>4} matrices  nnz {sm['nnz']:>12}  sparsity "
                 f"{sm['sparsity']:.4f}" + (f"  N:M valid {sm['nm_valid']}" if "nm_valid" in sm else ""))
    return "\n".join(lines)
