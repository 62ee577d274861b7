"""Every knob of a run, as dataclasses mirrored by one YAML file (configs/runs/*.yaml).

`load_config(path, overrides)` reads the YAML, applies `section.key=value` overrides, and rejects
unknown keys, wrong types and out-of-range values with a `ConfigError` that names the key and the
valid choices — before any model is loaded or anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml

from seft_scale.errors import ConfigError
from seft_scale.paths import resolve_path, resolve_source


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"sparsity pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    if not 0 < n < m:
        raise ValueError(f"sparsity pattern {pattern!r}: need 0 < N < M")
    return n, m


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on CPU (bf16 matmuls are ~15x slower than fp32 on AVX2 cores)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class TinyModelConfig:
    """A small random Llama built offline from this shape (tests, CI, smoke runs)."""

    hidden_size: int = 64
    """Model width."""
    intermediate_size: int = 160
    """MLP width (gate/up/down projections)."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention when fewer than query heads)."""
    vocab_size: int = 384
    """Vocabulary of the byte-level BPE tokenizer trained on the run's training text."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is set up for."""
    seed: int = 0
    """Seed of the random initialisation."""

    def validate(self) -> "TinyModelConfig":
        for f in dataclasses.fields(self):
            if f.name != "seed":
                _need(getattr(self, f.name) > 0, f"model.tiny.{f.name}", "must be > 0")
        _need(self.hidden_size % self.num_attention_heads == 0, "model.tiny.num_attention_heads",
              f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        _need(self.num_attention_heads % self.num_key_value_heads == 0, "model.tiny.num_key_value_heads",
              f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        return self


@dataclass
class ModelConfig:
    """Which causal LM to repair, and how to run it."""

    path: Optional[str] = None
    """A local Hugging Face model folder (config.json + safetensors). Nothing is downloaded.
    Leave empty to build the random model of `tiny`."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the random model built when `path` is empty."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """auto = flash_attention_2 when flash-attn is installed and CUDA is used, else sdpa."""
    trust_remote_code: bool = False
    """Allow model code shipped inside the model folder to run. Off unless you trust the folder."""

    def validate(self) -> "ModelConfig":
        if not self.path:
            self.tiny.validate()
        return self


@dataclass
class PruneConfig:
    """Pruning done at the start of the run (the result is saved as <output>/pruned)."""

    method: Literal["none", "magnitude", "wanda", "sparsegpt"] = "none"
    """none = the model is already pruned: its exact zeros define the support and budget.
    magnitude keeps the largest |W|; wanda the largest |W_ij|·‖X_j‖₂; sparsegpt prunes by OBS
    scores and updates the kept weights to reconstruct each layer's outputs. wanda and sparsegpt
    calibrate layer by layer on `calib_data` (see seft_scale/prune/sequential.py)."""
    sparsity: float = 0.5
    """Fraction of each target matrix set to zero (unstructured patterns; N:M implies 1 - N/M)."""
    pattern: str = "unstructured"
    """'unstructured' or 'N:M' (e.g. '2:4': at most N nonzeros in every M consecutive inputs).
    With method none, an N:M pattern is checked on the loaded model."""
    granularity: Literal["row", "matrix"] = "row"
    """Unstructured comparison groups: each output row (Wanda's choice) or the whole matrix."""
    calib_data: Optional[str] = None
    """Calibration data for wanda / sparsegpt: a .txt file, or any text source data.train takes
    (.json/.jsonl/.parquet/.csv with a `text` column, a folder of .txt, a dataset name),
    tokenised with the model's tokenizer and cut into `nsamples` random windows of `seqlen` tokens."""
    nsamples: int = 128
    """Calibration windows (128 in the Wanda and SparseGPT papers)."""
    seqlen: int = 2048
    """Tokens per calibration window (2048 in the papers; the text needs nsamples·seqlen tokens)."""
    seed: int = 0
    """Seed of the calibration windows' start positions."""
    block_size: int = 128
    """SparseGPT: columns per block of lazy updates and of adaptive mask selection."""
    damp: float = 0.01
    """SparseGPT: dampening λ added to the Hessian's diagonal, as a fraction of its mean."""

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        """The parsed pattern: (N, M), or None when unstructured."""
        return parse_pattern(self.pattern)

    def validate(self) -> "PruneConfig":
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            raise ConfigError(f"prune.pattern: {e}") from None
        if nm is not None:  # the pattern decides the sparsity; the saved config says which
            self.sparsity = 1 - nm[0] / nm[1]
        _need(0 <= self.sparsity < 1, "prune.sparsity", "must be in [0, 1)")
        _need(self.nsamples > 0, "prune.nsamples", "must be > 0")
        _need(self.seqlen > 1, "prune.seqlen", "must be > 1")
        _need(self.block_size > 0, "prune.block_size", "must be > 0")
        _need(self.damp > 0, "prune.damp", "must be > 0")
        _need(self.method not in ("wanda", "sparsegpt") or bool(self.calib_data), "prune.calib_data",
              f"method {self.method} needs calibration text (path of a .txt file)")
        return self


@dataclass
class SeftConfig:
    """The sparse delta and its topology evolution."""

    targets: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear layers to repair, matched against the last component of the module name."""
    lora_rank: Optional[int] = 32
    """Slot budget per matrix K = lora_rank·(d_in + d_out): the trainable count of a rank-r LoRA.
    Exactly one of lora_rank and density is set."""
    density: Optional[float] = None
    """Slot budget per matrix K = density·d_in·d_out."""
    update_interval: int = 10
    """ΔT: steps between topology updates (10 for instruction data, 60 for LM data)."""
    window: int = 5
    """A: steps before each update whose gradients score grow and adapt (see window_scores)."""
    window_scores: Literal["candidates", "dense"] = "candidates"
    """How the window's gradients are kept (seft/window.py). candidates: every slot (its G is its
    δ-gradient) plus, chosen at the window's first micro-batch, window_candidates·grown non-slot
    positions of largest |G| (grow) and max(window_candidates, 2)·grown support positions of
    smallest |θ·G| (adapt), G summed over the window there: O(K) memory. dense: fp32 sums over
    the whole shard (12 B per weight while the window is open), the exact reference."""
    window_candidates: float = 2.0
    """Non-slot grow candidates per slot the update grows (>= 1; adapt takes at least 2 per
    grown slot, enough for any overshoot). Each later window step samples G at all of them."""
    window_screen_stride: int = 4
    """Candidates window only: choose the non-slot candidates from the G of every s-th token of
    the window's first micro-batch (s = this), a dense matmul 1/s the size of the full weight
    gradient; that micro-batch's G then enters the sums at the candidates exactly, sampled at all
    its tokens like the later steps'. 1: from the full G (which then is the step's G). 4 saves
    ~0.2 of a LoRA step per window at Llama-2-7B's layers (README's benchmark) and repaired the
    demo model as well as 1 did at Wanda 50% (3 seeds) and 70% (2 seeds), within seed spread
    (README's Results)."""
    drop_rate: float = 0.2
    """p0: fraction of the K slots dropped and regrown at the first update."""
    drop_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """How the drop fraction decays over the run."""
    initial_reselection: bool = False
    """At the first update, drop and regrow all K slots (drop fraction 1), replacing the random
    initial placement with the window's choice as SpIEL's first selection does."""
    slot_warmup: int = 10
    """Lr ramp of grown slots: a slot's step is scaled by min(1, t / slot_warmup), t its optimizer
    steps since the topology update that grew it (the initial slots follow train.warmup_steps);
    0: off. Grown slots sit at the largest window gradients, and their first full-lr Adam steps
    (about ±lr each, p·K slots at once) raised the training loss by up to 0.26 one and two steps
    after each update; 10 removed that jump on the demo model (README's Results)."""
    merge_dropped: bool = True
    """Merge a dropped slot's value into θ (True) or discard it (False); see seft/topology.py."""
    adapt_criterion: Literal["sensitivity", "magnitude"] = "sensitivity"
    """Score for pruning back to the budget: |W·G| (the paper's) or |W| (its ablation)."""
    reactivation: bool = True
    """Let grow pick pruned positions. False restricts growth to the support (the paper's
    mask-constraint ablation). Always False in N:M mode."""
    kernel: Literal["auto", "sddmm", "dense"] = "auto"
    """How δ-gradients are computed outside selection windows (seft/kernels.py): sddmm at the K
    slot positions only, or dense through the full weight gradient; auto applies the cost rule."""
    gather_cost_ratio: float = 10.0
    """Cost of one sampled (SDDMM) multiply-add in matmul multiply-adds (cost rule: sddmm iff
    K·ratio < d_in·d_out). launch/bench/bench_step.py measures it: 12-17 at Llama-2-7B's matrices
    on 2 AVX2 cores (2026-12-01); 10 keeps every 7B matrix at r = 32 (n/K 26-93) on sddmm."""
    init_seed: int = 0
    """Seed of the initial slot placement (uniform over the support)."""

    def validate(self) -> "SeftConfig":
        _need((self.lora_rank is None) != (self.density is None), "seft.lora_rank/seft.density",
              "set exactly one of them")
        _need(self.lora_rank is None or self.lora_rank > 0, "seft.lora_rank", "must be > 0")
        _need(self.density is None or 0 < self.density <= 1, "seft.density", "must be in (0, 1]")
        _need(self.update_interval > 0, "seft.update_interval", "must be > 0")
        _need(0 < self.window <= self.update_interval, "seft.window", "must be in [1, update_interval]")
        _need(self.window_candidates >= 1, "seft.window_candidates", "must be >= 1")
        _need(self.window_screen_stride >= 1, "seft.window_screen_stride", "must be >= 1")
        _need(0 <= self.drop_rate <= 1, "seft.drop_rate", "must be in [0, 1]")
        _need(self.slot_warmup >= 0, "seft.slot_warmup", "must be >= 0")
        _need(self.gather_cost_ratio > 0, "seft.gather_cost_ratio", "must be > 0")
        _need(len(self.targets) > 0, "seft.targets", "must name at least one module")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"seft.targets: {pattern!r} is not a regular expression ({e})") from None
        return self


@dataclass
class DataConfig:
    """Training data and how it becomes fixed-length token examples (see seft_scale/data)."""

    train: str = ""
    """A local .txt / .json / .jsonl / .parquet / .csv file (optionally .gz), a folder of .txt
    files (one document each), or a Hugging Face dataset name (needs a reachable hub or the local
    datasets cache). Required."""
    format: Literal["auto", "txt", "json", "parquet", "csv", "hub"] = "auto"
    """How `train` and `validation` are read. auto: by the extension (.jsonl is json, a folder is
    .txt files); a name that is no local path and has no known extension is a hub dataset."""
    kind: Literal["text", "instruction"] = "text"
    """text: documents joined with EOS and packed into blocks of seq_len, loss on every token.
    instruction: one example per row rendered by `template`, loss on the response only."""
    template: Literal["alpaca", "commonsense", "plain"] = "alpaca"
    """Prompt of instruction data. alpaca: Stanford Alpaca's prompt (with / without input).
    commonsense: the prompt LLM-Adapters' commonsense_evaluate.py builds for commonsense_170k,
    byte for byte. plain: the instruction (and input) on its own lines."""
    text_field: str = "text"
    """Column holding the documents of text data (.txt files always give `text`)."""
    instruction_field: str = "instruction"
    """Column holding the instruction of instruction data."""
    input_field: str = "input"
    """Column holding the optional input (context) of instruction data; may be absent or empty."""
    output_field: str = "output"
    """Column holding the response, the only tokens with a loss (commonsense_170k: `output`,
    e.g. "the correct answer is true"; its `answer` column is for evaluation)."""
    subset: Optional[str] = None
    """Configuration name of a hub dataset (load_dataset's `name`, e.g. wikitext-2-raw-v1)."""
    split: str = "train"
    """Split of a hub dataset used for training (local files have only `train`)."""
    validation: Optional[str] = None
    """Held-out data from another source, read like `train`; replaces the val_fraction split."""
    validation_split: str = "validation"
    """Split of a hub dataset named in `validation`."""
    val_fraction: float = 0.05
    """Held out for validation when `validation` is empty: the last packed blocks of text data;
    for instruction data the examples with the smallest content hash (stable, order-free)."""
    max_examples: Optional[int] = None
    """Use only the first N rows (documents or examples) of `train`; empty: all."""
    seq_len: int = 128
    """Tokens per example: text is packed into blocks of this length; instruction examples are
    truncated or right-padded to it."""
    seed: int = 0
    """Seed of the per-epoch shuffle of training examples (batch_indices)."""
    cache_dir: Optional[str] = None
    """Where tokenised data is cached; empty: $SEFT_CACHE/data, else ~/.cache/seft_scale/data."""

    def validate(self) -> "DataConfig":
        _need(self.seq_len > 1, "data.seq_len", "must be > 1")
        _need(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
        _need(self.max_examples is None or self.max_examples > 0, "data.max_examples", "must be > 0")
        _need(bool(self.train), "data.train", "is required (a data file, folder or dataset name)")
        return self


@dataclass
class TrainConfig:
    """The loop."""

    steps: int = 40
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Sequences per forward pass (per rank)."""
    grad_accum: int = 1
    """Micro-batches summed per optimizer step."""
    lr: float = 1e-3
    """Peak learning rate of the δ values."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    weight_decay: float = 0.0
    """Decoupled weight decay on δ (pulls the delta, not the weight, towards 0)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.999
    """AdamW β2."""
    eps: float = 1e-8
    """AdamW ε."""
    max_grad_norm: float = 1.0
    """Clip the global δ-gradient norm to this (0 disables)."""
    seed: int = 0
    """Seed of torch's generators (dropout, if the model has any)."""
    log_every: int = 10
    """Steps between console log lines (metrics.jsonl gets every step)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    eval_batches: int = 8
    """Validation batches for the held-out loss at the end of the run (0 disables)."""
    check_invariants: bool = False
    """Check the exact budget after every step (costly on big models; always on in tests)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (HF
    gradient checkpointing, non-reentrant): activation memory of one layer instead of all, for
    about one more forward per step. launch/plan.py shows both."""

    def validate(self) -> "TrainConfig":
        for key in ("steps", "micro_batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            _need(getattr(self, key) > 0, f"train.{key}", "must be > 0")
        for key in ("warmup_steps", "checkpoint_every", "eval_batches", "max_grad_norm",
                    "weight_decay"):
            _need(getattr(self, key) >= 0, f"train.{key}", "must be >= 0")
        _need(self.lr > 0, "train.lr", "must be > 0")
        _need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _need(self.eps > 0, "train.eps", "must be > 0")
        return self


@dataclass
class FSDPConfig:
    """PyTorch FSDP2 settings (launch/train.py --backend fsdp; seft_scale/backends/fsdp.py)."""

    param_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the working weights FSDP all-gathers for each layer's forward and backward
    (MixedPrecisionPolicy.param_dtype). The sharded θ stays in model.dtype and δ in float32.
    auto = bfloat16 on CUDA, float32 on CPU."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype in which gradients are summed over ranks: the selection-window dense gradient
    (reduce-scattered into θ's row shards) and FSDP's own reductions (MixedPrecisionPolicy.
    reduce_dtype; θ is frozen, so it has none). δ-gradients are always summed in float32."""
    reshard_after_forward: bool = True
    """Free each decoder layer's gathered weights after its forward and gather them again for its
    backward: one layer's full weights in memory at a time. False keeps every layer gathered from
    forward to backward (one all-gather fewer per layer and step, the whole model at the peak)."""


@dataclass
class EvalConfig:
    """Evaluation inside a run (seft_scale/evaluate.py; launch/evaluate.py does the same for any
    saved folder). Runs on one process: sharded runs evaluate their export with launch/evaluate.py."""

    ppl_data: Optional[str | dict[str, str]] = None
    """Held-out text(s) for perplexity by the Wanda/SparseGPT protocol (.txt, or .json/.jsonl of
    {"text": ...} records, or `asset:` names): one path, named after its file, or a mapping
    {name: path} of several (e.g. in-domain and out-of-domain text), each measured on its own;
    the first is the run's headline perplexity. Empty: no perplexity."""
    seqlen: int = 512
    """Tokens per perplexity window."""
    max_windows: Optional[int] = None
    """Use only the first N windows (Wanda's C4 evaluation uses 256). Empty: all."""
    stages: list[Literal["dense", "pruned", "repaired"]] = field(
        default_factory=lambda: ["pruned", "repaired"])
    """When perplexity is measured: dense (before the run prunes; needs prune.method other than
    none), pruned (the starting sparse model), repaired (the merged result)."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval task names run on the repaired model (local YAML tasks through include_path)."""
    include_path: Optional[str] = None
    """Folder of local lm-eval task YAMLs."""
    limit: Optional[int] = None
    """Examples per lm-eval task (for quick checks). Empty: all."""
    plots: bool = True
    """Write loss.png (loss curve) and reactivation.png (per-layer reactivated positions) when
    matplotlib is installed."""

    def ppl_sets(self) -> dict[str, str]:
        """{name: path} of the perplexity texts, in the configured order (empty: none)."""
        if not self.ppl_data:
            return {}
        if isinstance(self.ppl_data, dict):
            return dict(self.ppl_data)
        return {Path(self.ppl_data).stem or "heldout": self.ppl_data}

    def validate(self) -> "EvalConfig":
        if isinstance(self.ppl_data, dict):
            _need(len(self.ppl_data) > 0, "eval.ppl_data", "an empty mapping; leave it empty instead")
            bad = [k for k in self.ppl_data if not re.fullmatch(r"[A-Za-z0-9_.-]+", k)]
            _need(not bad, "eval.ppl_data", f"text names {bad} must be letters, digits, _ . -")
        _need(self.seqlen > 1, "eval.seqlen", "must be > 1")
        _need(self.max_windows is None or self.max_windows > 0, "eval.max_windows", "must be > 0")
        _need(self.limit is None or self.limit > 0, "eval.limit", "must be > 0")
        return self


@dataclass
class BaselineConfig:
    """The baselines' own settings (methods static, lora_star, sqft, spp; seft_scale/baselines/)."""

    lora_rank: Optional[int] = None
    """Rank r of the trainable budget r·(d_in+d_out) per matrix: LoRA's rank (lora_star, sqft)
    and what spp's row-group count is matched to. Empty: seft.lora_rank, so every method trains
    (about) SEFT's K = r·(d_in+d_out) values per matrix."""
    lora_alpha: Optional[float] = None
    """Scaling numerator: the update is scaled by alpha / r (lora_star, sqft, spp). Empty: 2·r,
    the α/r = 2 of every source paper's defaults (Wanda's LoRA 16/8, SQFT 64/32, SPP 16/8)."""
    lora_dropout: Optional[float] = None
    """Dropout on the adapter's input (lora_star, sqft, spp). Empty: the method's paper default
    (lora_star 0.05, sqft 0.1, spp 0.05; see each module under seft_scale/baselines/)."""
    reprune: Optional[Literal["magnitude", "wanda", "sparsegpt"]] = None
    """The pruner lora_star re-prunes with after merging, calibrated on prune.calib_data
    (prune.nsamples, seqlen, seed) for wanda / sparsegpt. Empty: prune.method, the pruner that
    made the start; required when the start comes pruned (prune.method none)."""
    spp_groups: Optional[int] = None
    """spp's row groups r_g per matrix (W_α is r_g × d_in; r_g must divide d_out). Empty: per
    matrix the divisor of d_out that brings r_g·d_in + d_out closest to r·(d_in+d_out) (a
    deviation from SPP's code, which fixes 16, made to compare at equal budgets); 16: SPP's code."""

    def validate(self) -> "BaselineConfig":
        _need(self.lora_rank is None or self.lora_rank > 0, "baseline.lora_rank", "must be > 0")
        _need(self.lora_alpha is None or self.lora_alpha > 0, "baseline.lora_alpha", "must be > 0")
        _need(self.lora_dropout is None or 0 <= self.lora_dropout < 1, "baseline.lora_dropout",
              "must be in [0, 1)")
        _need(self.spp_groups is None or self.spp_groups > 0, "baseline.spp_groups", "must be > 0")
        return self


@dataclass
class RunConfig:
    """One run: model, pruning, repair method, data and loop."""

    method: Literal["seft", "static", "lora_star", "sqft", "spp", "none"] = "seft"
    """Repair method: seft, or a baseline at the same sparsity (seft_scale/methods.py): static
    (all nonzeros trainable, mask re-applied), lora_star (LoRA, merge, re-prune), sqft (LoRA masked
    by the support), spp (SPP's W ⊙ (1 + s·W_α W_β) update), none (the pruned model as it is)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The causal LM to repair."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Pruning at the start of the run (none: the model comes pruned)."""
    seft: SeftConfig = field(default_factory=SeftConfig)
    """The sparse delta and its topology evolution (method seft); targets for every method."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop: steps, batch, optimizer, checkpoints."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP2 settings; read only by --backend fsdp."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """Settings of the baselines (LoRA rank and scaling, lora_star's re-pruner, spp's groups)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Perplexity / lm-eval inside the run."""

    def validate(self) -> "RunConfig":
        """Every section's own types and ranges, then what depends on two sections."""
        for section in (self.model, self.prune, self.seft, self.data, self.train, self.baseline,
                        self.eval):
            section.validate()
        if self.method in ("lora_star", "sqft", "spp"):
            _need(self.baseline.lora_rank is not None or self.seft.lora_rank is not None,
                  "baseline.lora_rank", f"method {self.method} needs a rank (this one or seft.lora_rank)")
        if self.method == "lora_star":
            pruner = self.baseline.reprune or self.prune.method
            _need(pruner != "none", "baseline.reprune",
                  "method lora_star re-prunes after merging with the pruner that made the start; the "
                  "start comes pruned (prune.method none), so name it: magnitude, wanda or sparsegpt "
                  "(wanda / sparsegpt also need prune.calib_data)")
            _need(pruner not in ("wanda", "sparsegpt") or bool(self.prune.calib_data), "prune.calib_data",
                  f"lora_star re-prunes with {pruner}, which needs calibration text")
        _need("dense" not in self.eval.stages or self.prune.method != "none", "eval.stages",
              "dense needs a run that prunes (prune.method other than none)")
        return self

    def check_context(self, max_positions: Optional[int], source: str) -> "RunConfig":
        """Every token length the run uses against the model's context (`max_positions`, the
        max_position_embeddings of `source`; None: the model does not say). Rotary models run
        past it without an error, on positions they were never trained on."""
        if max_positions is None:
            return self
        for key, length, used in (
                ("data.seq_len", self.data.seq_len, True),
                ("eval.seqlen", self.eval.seqlen, bool(self.eval.ppl_data)),
                ("prune.seqlen", self.prune.seqlen, self.prune.method in ("wanda", "sparsegpt"))):
            _need(not used or length <= max_positions, key, f"{length} exceeds the model's "
                  f"max_position_embeddings {max_positions} ({source})")
        return self

    def resolve_paths(self, base_dir: Optional[Path] = None) -> "RunConfig":
        """Make every local path absolute (relative ones are tried against the working directory,
        then `base_dir`, the config file's folder) and check it exists; `asset:` names are built."""
        d, e, p = self.data, self.eval, self.prune
        d.train = resolve_source(d.train, d.format, base_dir, "data.train")
        if d.validation:
            d.validation = resolve_source(d.validation, d.format, base_dir, "data.validation")
        calibrated = ("wanda", "sparsegpt")
        if p.method in calibrated or (self.method == "lora_star" and self.baseline.reprune in calibrated):
            p.calib_data = resolve_source(p.calib_data, "auto", base_dir, "prune.calib_data")
        if isinstance(e.ppl_data, dict):
            e.ppl_data = {k: resolve_path(v, base_dir, f"eval.ppl_data.{k}") for k, v in e.ppl_data.items()}
        elif e.ppl_data:
            e.ppl_data = resolve_path(e.ppl_data, base_dir, "eval.ppl_data")
        if e.include_path:
            e.include_path = resolve_path(e.include_path, base_dir, "eval.include_path")
        if self.model.path:
            self.model.path = resolve_path(self.model.path, base_dir, "model.path")
            _need(Path(self.model.path, "config.json").is_file(), "model.path",
                  f"{self.model.path} is not a Hugging Face model folder (no config.json)")
        return self


# ---------------------------------------------------------------------------- YAML <-> dataclasses

class _Loader(yaml.SafeLoader):
    """YAML numbers as people write them: `2:4` stays a string (YAML 1.1 would read base-60 124)
    and `1e-3` is a float (YAML 1.1 would read a string)."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in _NUMBER_TAGS]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_NUMBER_TAGS[0], re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    _NUMBER_TAGS[1],
    re.compile(r"^[-+]?([0-9][0-9_]*(\.[0-9_]*)?|\.[0-9_]+)([eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."))


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    """A key given twice is an error: YAML loaders silently keep the later value."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the base constructor reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def yaml_error(e: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own text spans several lines with a source excerpt)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = problem or " ".join(str(e).split())
    context = getattr(e, "context", None)
    return f"{where}{what}" + (f" ({context})" if context else "")


def read_yaml_file(path: str | Path, what: str = "--config"):
    """The parsed YAML file `path`; a missing file or a YAML error is a ConfigError naming `what`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    try:
        return parse_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {path} is not valid YAML: {yaml_error(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # str | dict[...]: the member the value's kind names
            for a in inner:
                if isinstance(value, typing.get_origin(a) or a):
                    return _coerce(value, a, key)
            raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
        return _coerce(value, inner[0], key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key}"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """The dataclass `cls` from a YAML mapping: unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{key}: unknown key; valid keys{' of ' + prefix if prefix else ''}: "
                              f"{', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: Optional[str], overrides: tuple[str, ...] | list[str] = (),
                check_paths: bool = True) -> RunConfig:
    """Read, override and validate a run config; raises ConfigError naming the bad key."""
    data: dict = {}
    base_dir = None
    if path is not None:
        data = read_yaml_file(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
        base_dir = Path(path).resolve().parent
    for item in overrides:
        _set_override(data, item)
    cfg = from_dict(RunConfig, data).validate()
    _check_implied_sparsity(cfg, (data.get("prune") or {}).get("sparsity"))
    return cfg.resolve_paths(base_dir) if check_paths else cfg


def _check_implied_sparsity(cfg: RunConfig, given: Optional[float]) -> None:
    """An N:M pattern fixes the sparsity (validate sets it); a different one given beside it is
    a contradiction, not a choice (seft-prune refuses the same pair of flags)."""
    nm = cfg.prune.nm
    if nm is not None and given is not None and abs(float(given) - cfg.prune.sparsity) > 1e-9:
        raise ConfigError(f"prune.sparsity: {given} contradicts prune.pattern {cfg.prune.pattern}, "
                          f"which means sparsity {cfg.prune.sparsity:g}; drop one of them")


def max_positions(model_dir: Optional[str | Path], tiny: TinyModelConfig) -> tuple[Optional[int], str]:
    """(the context length of a model, where it was read): config.json's max_position_embeddings
    of `model_dir` (None when it has none), else the tiny shape's."""
    if model_dir is None:
        return tiny.max_position_embeddings, "model.tiny"
    path = Path(model_dir, "config.json")
    try:
        value = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"model.path: {path} is not a readable JSON object ({e})") from None
    return (value if isinstance(value, int) and value > 0 else None), str(path)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
