"""Per-GPU memory of a SEFT run before it runs: the formula seft-plan prints and
tests/distributed/test_plan_measured.py checks against memory measured on CPU runs at 1-3 ranks.

Every figure is for the worst rank (rank 0: ZeRO-3 pads each flat parameter to W·ceil(n/W); FSDP2
gives the first ranks ceil(rows/W) rows) and follows what the code does:

resident  θ shard (model dtype); SEFT slots: the SparseDelta fields pos, δ, δ-grad, Adam m and v,
          age (dtypes read off seft/delta.py), K/W per rank, assuming slots spread evenly over the
          flat range; ZeRO-3's whole copies of parameters under the persistence threshold. The
          support is derived (no mask); the θ-edit bitmap (a bit per weight) is in host memory.
step      Saved activations (HF Llama blocks; with train.activation_checkpointing each layer's input
          plus one layer recomputed in backward), weights gathered by the sharding backend, and
          the sparse-delta kernel's scratch for one matrix (its gathered slots, the sddmm's
          operands). The step's peak is the larger of the end of the forward (ZeRO-3 still holds
          its all-gather buffers) and the start of the backward (fp32 log-softmax and the
          gradients of it and the logits, or the kernel's scratch plus one MLP's gradients).
window    The window scores (seft.window_scores: O(K) candidates, or 12 B per weight dense) from
          the window's first step to the update, and one matrix's full G with its reduce-scatter
          buffers (and, for candidates, the scratch of choosing them at the first micro-batch).
update    topology_update runs one decoder layer at a time over the candidates (or, dense, over
          every element of the layer's shards).
LoRA      The same run with a PEFT LoRA of the same rank (LORA_B per trainable value, the same
          activations plus x·Aᵀ per target), for the comparison users make.

Under ZeRO param offload θ's partitions and the SEFT state next to them (slots, mask, G
accumulator, update scratch) are in host memory (backends/zero3.py); the rest stays on the GPU.
It fits a GPU when the peak <= (memory - HEADROOM_GIB) x FRAGMENTATION.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from seft_scale.backends.ds_config import read_ds_json
from seft_scale.config import FSDPConfig, SeftConfig, from_dict, load_config, read_yaml_file
from seft_scale.errors import ConfigError
from seft_scale.seft.budget import slot_capacity
from seft_scale.seft.delta import SparseDelta
from seft_scale.seft.kernels import SDDMM_BLOCK_BYTES, choose_kernel
from seft_scale.seft.selection import sample_stride
from seft_scale.seft.window import SCAN_BLOCK

GIB = 1 << 30
HEADROOM_GIB = 2.0  # CUDA context, cuBLAS workspaces, NCCL buffers
FRAGMENTATION = 0.9  # what PyTorch's caching allocator can hand out of the rest
# Total memory as nvidia-smi / rocm-smi report it, GiB.
GPUS = {"h100-80gb": 79.6, "h100-94gb": 93.1, "h200-141gb": 140.4, "a100-80gb": 80.0,
        "a100-40gb": 40.0, "l40s-48gb": 45.0, "a10g-24gb": 22.5, "rtx4090-24gb": 24.0,
        "v100-32gb": 32.0, "mi300x-192gb": 192.0}
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}
BACKENDS = ("local", "zero3", "fsdp")
_LLAMA_FAMILY = ("llama", "mistral")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder in Hugging Face config.json terms (the keys presets use)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    head_dim: Optional[int] = None
    """None: hidden_size / num_attention_heads (set so on construction)."""
    tie_word_embeddings: bool = False

    def __post_init__(self):
        object.__setattr__(self, "head_dim", self.head_dim or self.hidden_size // self.num_attention_heads)

    @classmethod
    def from_hf(cls, cfg: dict, source: str) -> "ModelShape":
        """From a config.json dict or a preset's `shape`; names the missing or bad key."""
        if cfg.get("model_type", "llama") not in _LLAMA_FAMILY:
            raise ConfigError(f"{source}: model_type {cfg['model_type']!r} is not a Llama-style "
                              f"decoder ({', '.join(_LLAMA_FAMILY)}); the formula would not hold")
        cfg = {"num_key_value_heads": cfg.get("num_attention_heads"), **cfg}  # HF's default: MHA
        kw = {}
        for f in dataclasses.fields(cls):
            v = cfg.get(f.name)
            if v is None:
                if f.default is dataclasses.MISSING:
                    raise ConfigError(f"{source}: no {f.name}")
                continue
            if f.name == "tie_word_embeddings":
                if not isinstance(v, bool):
                    raise ConfigError(f"{source}: tie_word_embeddings must be true or false")
            elif not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{source}: {f.name} must be a positive integer, got {v!r}")
            kw[f.name] = v
        shape = cls(**kw)
        if shape.num_attention_heads % shape.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads {shape.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads {shape.num_key_value_heads}")
        return shape

    def layer_linears(self) -> list[tuple[str, int, int]]:
        """(name, d_out, d_in) of one decoder layer's projections."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q),
                ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]

    def parameters(self) -> list[tuple[str, int, int, int]]:
        """(name, rows, cols, how many) of every parameter."""
        h, v, n = self.hidden_size, self.vocab_size, self.num_hidden_layers
        out = [("embed_tokens", v, h, 1)] + [(name, r, c, n) for name, r, c in self.layer_linears()]
        out += [("input_layernorm", h, 1, n), ("post_attention_layernorm", h, 1, n), ("norm", h, 1, 1)]
        return out + ([] if self.tie_word_embeddings else [("lm_head", v, h, 1)])

    def num_params(self) -> int:
        return sum(r * c * k for _, r, c, k in self.parameters())


# --------------------------------------------------------------------------------------- presets

@dataclass
class Preset:
    """configs/models/<name>.yaml: a published model's shape, SEFT targets and backend settings."""

    name: str
    """Short name, e.g. llama-2-70b."""
    source: str
    """Where the shape comes from (the model's repository and its config.json)."""
    shape: ModelShape
    """The decoder's shape in config.json keys."""
    seft: SeftConfig
    """Recommended SEFT settings; a run config's own `seft` section replaces them."""
    fsdp: FSDPConfig
    """Recommended FSDP2 settings, for the run config's `fsdp` section."""
    zero_optimization: dict
    """Recommended DeepSpeed zero_optimization block (plan.py --write-ds-config merges it into a
    DeepSpeed JSON for launch/train.py --ds_config)."""
    path: str = ""


_PRESET_KEYS = ("name", "source", "shape", "seft", "fsdp", "zero_optimization")


def read_yaml(path: str | Path, what: str = "--config") -> dict:
    data = read_yaml_file(path, what) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping")
    return data


def load_preset(path: str | Path) -> Preset:
    """Read and validate a preset; the ConfigError names the bad key."""
    data = read_yaml(path, "preset")
    if "shape" not in data:
        raise ConfigError(f"{path}: not a model preset (no `shape` section)")
    unknown = sorted(set(data) - set(_PRESET_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid: {', '.join(_PRESET_KEYS)}")
    zero = data.get("zero_optimization") or {}
    zero_config(zero, f"{path}: zero_optimization")
    return Preset(name=data.get("name", Path(path).stem), source=data.get("source", ""),
                  shape=ModelShape.from_hf(data["shape"], f"{path}: shape"),
                  seft=from_dict(SeftConfig, data.get("seft") or {}, "seft"),
                  fsdp=from_dict(FSDPConfig, data.get("fsdp") or {}, "fsdp"),
                  zero_optimization=zero, path=str(path))


def zero_config(zero: dict, what: str):
    """DeepSpeed's own model of a zero_optimization block (it rejects unknown keys)."""
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        raise ConfigError(f"{what}: ZeRO settings are read with DeepSpeed's config model: "
                          "pip install -e '.[deepspeed]'") from None
    try:
        cfg = DeepSpeedZeroConfig(**{"stage": 3, **zero})
    except Exception as e:  # pydantic's ValidationError names every bad key
        raise ConfigError(f"{what}: {e}") from None
    if int(cfg.stage) != 3:
        raise ConfigError(f"{what}: stage must be 3 (the zero3 backend), got {int(cfg.stage)}")
    return cfg


def write_ds_config(base: Optional[str | Path], zero: dict, out: str | Path) -> dict:
    """The DeepSpeed JSON `base` (None: the default) with its zero_optimization updated by `zero`,
    written to `out`."""
    ds = read_ds_json(base, "--ds-config")
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), **zero}
    zero_config(ds["zero_optimization"], f"{out}: zero_optimization")
    Path(out).write_text(json.dumps(ds, indent=2) + "\n")
    return ds


# ------------------------------------------------------------------------------------ the formula

@dataclass
class PlanInput:
    """What the formula reads; launch/plan.py fills it from a run config and/or a preset."""

    shape: ModelShape
    """The decoder's shape."""
    seft: SeftConfig
    """Targets and slot budget (lora_rank or density), update schedule, kernel choice."""
    world: int = 1
    """Ranks (GPUs) in all."""
    backend: str = "local"
    """local, zero3 or fsdp."""
    dtype: str = "bfloat16"
    """θ's storage dtype (model.dtype resolved for the device)."""
    compute_dtype: str = "bfloat16"
    """Working weights and activations: FSDP's param_dtype, the model dtype elsewhere."""
    micro_batch: int = 1
    """Sequences per rank per forward (train.micro_batch_size)."""
    seq_len: int = 2048
    """Tokens per sequence (data.seq_len)."""
    reshard_after_forward: bool = True
    """fsdp.reshard_after_forward."""
    activation_checkpointing: bool = False
    """train.activation_checkpointing: keep each layer's input, recompute the layer in backward."""
    zero: dict = field(default_factory=dict)
    """DeepSpeed zero_optimization block (zero3 only)."""
    gpus_per_node: int = 1
    """Ranks per node (host memory per node under offload)."""
    nm: bool = False
    """prune.pattern is N:M: growth stays inside the support, so adapt keeps no candidates."""


@dataclass
class Line:
    name: str
    phase: str
    bytes: float
    formula: str


@dataclass
class MemoryPlan:
    inp: PlanInput
    lines: list[Line]
    step_peak: float
    window_peak: float
    update_peak: float
    num_params: int
    target_numel: int
    slots: int
    cpu_bytes_per_rank: float = 0.0
    checkpointed_activations: float = 0.0
    lora_peak: float = 0.0
    """The same run with a PEFT LoRA of rank `lora_rank` instead of SEFT (LORA_B per value)."""
    lora_rank: int = 0

    @property
    def peak(self) -> float:
        return max(self.step_peak, self.window_peak, self.update_peak)

    def get(self, name: str) -> float:
        return sum(x.bytes for x in self.lines if x.name == name)

    @property
    def resident(self) -> float:
        return sum(x.bytes for x in self.lines if x.phase == "resident")


def usable_bytes(gpu_gib: float) -> float:
    return max(gpu_gib - HEADROOM_GIB, 0.0) * FRAGMENTATION * GIB


def _targets(shape: ModelShape, patterns: list[str]) -> list[tuple[str, int, int]]:
    regs = [re.compile(p) for p in patterns]
    found = [m for m in shape.layer_linears() if any(r.fullmatch(m[0]) for r in regs)]
    if not found:
        raise ConfigError(f"seft.targets: {patterns} match no projection of a Llama layer "
                          f"({', '.join(m[0] for m in shape.layer_linears())})")
    return found


def _slot_layout() -> tuple[int, str]:
    """(bytes per slot, description), read off a SparseDelta."""
    d = SparseDelta("probe", (1, 1), 0, torch.ones(1), 1, 1)
    fields = {"pos": d.pos, "δ": d.values, "δ-grad": d.values, "m": d.exp_avg, "v": d.exp_avg_sq,
              "age": d.age, "steps since grown": d.since_grown}
    desc = ", ".join(f"{k} {str(t.dtype).removeprefix('torch.')}" for k, t in fields.items())
    return sum(t.element_size() for t in fields.values()), desc


# Bytes per candidate of the window scores (seft/window.py CandidateWindow): each position of the
# union keeps a local index (int64), Σ G, Σ G², the step's G (fp32) and its set bits; a slot also
# where it sits in the union (int64), a non-slot candidate its sampled position and place (2 int64)
CANDIDATE_B, SLOT_CANDIDATE_B, SAMPLED_CANDIDATE_B = 21, 8, 16
DENSE_WINDOW_B = 12  # DenseWindow: Σ G, Σ G² and the step's G, fp32, per weight of the shard
# Scratch of choosing candidates at the window's first micro-batch (seft/window.py), per element
# of the strided sample (support mask, W, |G|, |W·G| and their filtered copies; every element of
# shards below selection.SAMPLE_MIN) and of one scan block (|G|, |θ·G|, masks); the top-k then runs
# over the ~K entries that pass. Fitted at stride 1 (tests/distributed/test_plan_measured.py)
CHOOSE_B = 2.5
# Scratch of a topology update, one layer at a time, per window entry of the rank (the slots and
# the non-slot candidates; per element of its shards with dense scores): the filtered entries,
# their global positions (int64), scores (fp32), the select's keys and the k-th-value pre-filter
# (the update's entry flags are one matrix's at a time); plus, per slot of the layer and on every
# rank, the part that does not shrink with W (each rank keeps up to k of its entries for the exact
# select). Fitted to CPU runs at 1-3 ranks and screen strides 1 and 4
# (tests/distributed/test_plan_measured.py): 12.8 B and 3.6 B
UPDATE_B, UPDATE_RANK_B = 12.8, 3.6
DENSE_UPDATE_B = 22  # the same scratch per element of the shard with dense window scores (fitted alike)
# LoRA's trainable state per value (LoRA line): parameter, gradient and two fp32 Adam moments, the
# parameter kept in fp32 (PEFT casts adapters to fp32 under autocast; DeepSpeed/FSDP keep fp32
# masters of 16-bit ones)
LORA_B = 16


def _grow_bound(seft: SeftConfig, k: int, n: int) -> int:
    """Slots one update grows in a matrix of K slots and n weights: K at a full first reselection,
    else the drops p0·K plus the refills of slots the previous adapt freed. Adapt prunes about as
    many positions as were reactivated (at most the drops), and a share ~K/|M| of those hold a
    slot; |M| taken as n/2 (measured at 1-3 ranks: tests/distributed/test_plan_measured.py)."""
    return k if seft.initial_reselection else min(k, math.ceil(seft.drop_rate * k * (1 + 2 * k / n) - 1e-9))


def _non_slot_candidates(seft: SeftConfig, k: int, n: int, nm) -> int:
    """Non-slot candidates of a matrix's window (seft/window.py open_window): c·grown for grow,
    max(c, 2)·grown for adapt when it ranks by sensitivity over a support that can grow."""
    g, c = _grow_bound(seft, k, n), seft.window_candidates
    adapt = seft.adapt_criterion == "sensitivity" and seft.reactivation and not nm
    return math.ceil(c * g) + (math.ceil(max(c, 2.0) * g) if adapt else 0)


def plan_memory(inp: PlanInput) -> MemoryPlan:
    """Per-rank memory of the worst rank, by component (see the module docstring)."""
    s, W, be = inp.shape, inp.world, inp.backend
    if be not in BACKENDS:
        raise ConfigError(f"--backend: {be!r} is not one of {', '.join(BACKENDS)}")
    if W < 1 or (be == "local" and W != 1):
        raise ConfigError(f"--world-size: {W} ranks for the {be} backend"
                          + (" (it runs on one process)" if be == "local" else ""))
    for key in ("dtype", "compute_dtype"):
        if getattr(inp, key) not in DTYPES:
            raise ConfigError(f"--dtype: {getattr(inp, key)!r} is not one of {', '.join(DTYPES)}")
    e, ec = DTYPES[inp.dtype], DTYPES[inp.compute_dtype]
    B, L, H, V = inp.micro_batch, inp.seq_len, s.hidden_size, s.vocab_size
    inter = s.intermediate_size
    nl, heads, kvd = s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads * s.head_dim
    T = B * L
    zero = zero_config(inp.zero, "zero_optimization") if be == "zero3" else None
    offload = zero is not None and zero.offload_param is not None and \
        str(zero.offload_param.device).endswith("cpu")
    sf = inp.seft

    def shard(rows: int, cols: int) -> int:
        """Elements rank 0 allocates for a rows x cols parameter."""
        return math.ceil(rows / W) * cols if be == "fsdp" else math.ceil(rows * cols / W)

    targets = _targets(s, sf.targets)
    caps = [slot_capacity((r, c), sf) for _, r, c in targets]
    slot_b, slot_desc = _slot_layout()
    n_shard = nl * sum(shard(r, c) for _, r, c in targets)
    k_shard = nl * sum(math.ceil(k / W) for k in caps)  # slots spread evenly over the ranges
    lines: list[Line] = []

    def add(name: str, phase: str, nbytes: float, formula: str) -> float:
        lines.append(Line(name, phase, float(nbytes), formula))
        return float(nbytes)

    # -- resident: on the GPU, or in host memory under ZeRO param offload (zero3.py keeps the SEFT
    # state next to θ's partitions)
    where = "cpu" if offload else "resident"
    theta = add("θ shard", where, sum(shard(r, c) * k for _, r, c, k in s.parameters()) * e,
                f"Σ_params {'ceil(rows/W)·cols' if be == 'fsdp' else 'ceil(numel/W)'} · {e} B")
    persistent = 0
    if zero is not None:
        budget = zero.model_persistence_threshold
        for _, r, c, k in s.parameters():
            for _ in range(k):  # DeepSpeed marks parameters in order until the model budget is used
                if r * c <= zero.param_persistence_threshold and persistent + r * c <= budget:
                    persistent += r * c
        add("ZeRO-3 persistent params", "resident", persistent * e,
            f"params of <= stage3_param_persistence_threshold={zero.param_persistence_threshold} "
            f"elements, whole · {e} B")
    seft_state = add("SEFT slots + optimizer", where, k_shard * slot_b,
                     f"K/W slots · {slot_b} B ({slot_desc})")
    edits = add("θ-edit bitmap (host memory)", "host", n_shard / 8,
                "Σ_targets numel/W / 8 B: a bit per weight; the support is derived, not stored")

    # -- a training step
    # Saved per decoder layer (HF Llama, sdpa/flash, GQA without repeating k/v): both RMSNorms'
    # fp32 inputs and rsqrt; the normed inputs of q/k/v and of gate/up; q, k, v, the attention
    # output and its fp32 logsumexp; gate, silu(gate), up, silu·up. Frozen weights save nothing
    # for themselves: layer 0's input norm (its input is the frozen embedding) and lm_head keep no
    # input; the final norm keeps its fp32 input; rotary cos/sin are shared by the layers.
    per_layer = 8 * T * H + 8 * T + ec * (4 * T * H + 2 * T * kvd + 4 * T * inter) + 4 * heads * T
    final = 4 * T * H + 4 * T + 2 * L * s.head_dim * ec
    recompute = 0
    if inp.activation_checkpointing:
        acts = add("activations", "step", nl * ec * T * H + final,
                   f"layers·{ec}·BLH (each layer's input, train.activation_checkpointing) + final "
                   f"norm, B={B} L={L}")
        recompute = add("recomputed layer (backward)", "step", per_layer,
                        "one layer's activations, recomputed for its backward")
    else:
        acts = add("activations", "step", nl * per_layer - (4 * T * H + 4 * T) + final,
                   f"layers·[(8+{4 * ec})·BLH + {4 * ec}·BLI + {2 * ec}·BL·kv_dim + 4·B·heads·L] + "
                   f"final norm; no activation checkpointing, B={B} L={L}")
    acts_fwd = acts - final
    logits = add("logits + loss", "step", 12 * T * V,
                 "12·BLV at the start of the backward: fp32 log-softmax, its gradient and the logits' "
                 "gradient (the loop keeps only the loss, so the logits are freed)")
    # an MLP's backward holds the gradients of gate, up, silu·up (3·BLI) and of its input and
    # output (2·BLH); by then autograd has freed two of its four saved BLI activations (the
    # down_proj input, then silu(gate) and up after the product's backward)
    mlp_grads = ec * (3 * T * inter + 2 * T * H) - 2 * ec * T * inter
    layer_numel = sum(r * c for _, r, c in s.layer_linears()) + 2 * H
    gather_buffer = 0.0  # FSDP2's all-gather output, alive while it is copied into the params
    if be == "fsdp":
        root = (V * H * (1 if s.tie_word_embeddings else 2) + H) * ec
        kept = 2 if inp.reshard_after_forward else nl
        why = "current + prefetched" if kept == 2 else "reshard_after_forward=false"
        gw_fwd = gw_bwd = add("FSDP gathered weights", "step", root + kept * layer_numel * ec,
                              f"root (embeddings, lm_head, norm) + {kept} layers ({why}) · {ec} B")
        gather_buffer = add("FSDP all-gather buffer", "step", layer_numel * ec,
                            "one layer while a prefetched layer is copied out of it")
    elif be == "zero3":
        # After the first step ZeRO keeps a fetched parameter until it is next used if that is
        # within max_reuse_distance elements (in forward+backward order: the last ~distance/2 of
        # the model) and prefetches prefetch_bucket_size ahead; the all-gather's flat buffer lives
        # until the end of the forward next to the parameters' own copies (measured on CPU).
        nonpersistent = s.num_params() - persistent
        live = min(nonpersistent, zero.max_reuse_distance // 2 + layer_numel
                   + min(zero.prefetch_bucket_size, zero.max_live_parameters))
        gw_bwd = add("ZeRO-3 gathered weights", "step", live * ec,
                     f"min(non-persistent params, max_reuse_distance/2 + one layer + prefetch "
                     f"bucket) · {ec} B")
        gw_fwd = add("ZeRO-3 all-gather buffers (forward)", "forward", live * ec,
                     "as many again until the end of the forward")
        gw_fwd += gw_bwd
    else:
        gw_fwd = gw_bwd = 0.0
    # the kernel, one matrix at a time: its gathered slots (W > 1) and, in backward, the sddmm's
    # CSR pattern, fp32 token blocks and δ-gradients, or the dense kernel's G
    def kernel_scratch(r: int, c: int, k: int, sampled: int = 0) -> int:
        """One matrix's backward: gathered slots (W > 1) and the sddmm over k (then `sampled`)
        positions (its CSR pattern, positions, values and fp32 token blocks) or the dense kernel's G."""
        kernel = sf.kernel if sf.kernel != "auto" else choose_kernel(k, r * c, sf.gather_cost_ratio)
        block = max(64, SDDMM_BLOCK_BYTES // (4 * max(r, c)))
        if kernel == "dense" and not sampled:
            return (12 * k if W > 1 else 0) + r * c * ec + 4 * k
        # the window's candidates are a second sddmm after the slots' (whose 4 B·K result waits)
        return (12 * k if W > 1 else 0) + 32 * max(k, sampled) + 4 * min(k, sampled) \
            + 4 * min(T, block) * (r + c) + 8 * r

    bwd_scratch = max(kernel_scratch(r, c, k) for (_, r, c), k in zip(targets, caps))
    add("sparse-delta kernel scratch", "step", bwd_scratch,
        "one matrix: gathered (pos, δ) 12 B·K (W > 1) + sddmm: 32 B·K + fp32 token blocks of g, x "
        "| dense: G in compute dtype")
    step_peak = max(  # the end of the forward, or the start of the backward
        acts_fwd + gw_fwd,
        acts + gw_bwd + max(logits, recompute + bwd_scratch + mlp_grads, gather_buffer))

    # -- selection window: the window scores live from the window's first step to the update
    if sf.window_scores == "dense":
        scores = add("window scores (dense)", "window", n_shard * DENSE_WINDOW_B,
                     f"Σ_targets numel/W · {DENSE_WINDOW_B} B (fp32 Σ G, Σ G², step G)")
    else:
        n_free = nl * sum(math.ceil(_non_slot_candidates(sf, k, r * c, inp.nm) / W)
                         for (_, r, c), k in zip(targets, caps))
        scores = add("window scores (candidates)", "window",
                     k_shard * (CANDIDATE_B + SLOT_CANDIDATE_B)
                     + n_free * (CANDIDATE_B + SAMPLED_CANDIDATE_B),
                     f"K/W slots · {CANDIDATE_B + SLOT_CANDIDATE_B} B + (c + max(c, 2))·grown/W non-slot "
                     f"candidates · {CANDIDATE_B + SAMPLED_CANDIDATE_B} B (c = seft.window_candidates)")
    n_max = max(r * c for _, r, c in targets)
    shard_max = max(shard(r, c) for _, r, c in targets)
    # G's fp32 shard is a copy also at one fp32 rank (measured: the transposed product is copied)
    g_one = n_max * ec + shard_max * 4 \
        + (math.ceil(n_max / W) * W * 4 if W > 1 else 0)
    if sf.window_scores == "candidates":
        sampled_elems = math.ceil(shard_max / sample_stride(shard_max)) + min(shard_max, SCAN_BLOCK)
        g_one += CHOOSE_B * sampled_elems
    add("one matrix's dense G", "window", g_one,
        "largest target: G in compute dtype, its fp32 shard, reduce-scatter chunks (W > 1)"
        + (f", choosing candidates {CHOOSE_B} B per element of the sample and of a scan block"
           if sf.window_scores == "candidates" else ""))
    # the dense G of a window's first micro-batch peaks at each layer's first target in backward
    # (down_proj): without checkpointing only its own input and output gradient are alive next to
    # the saved activations; with it the layer is recomputed first, its MLP gradients follow (measured)
    # later window steps (candidates) sample G at every candidate by an sddmm beside the slots'
    sampled = max(kernel_scratch(r, c, k, sampled=_non_slot_candidates(sf, k, r * c, inp.nm))
                  for (_, r, c), k in zip(targets, caps)) if sf.window_scores == "candidates" else 0
    window_peak = max(acts_fwd + gw_fwd, acts + gw_bwd + max(
        logits, recompute + g_one + (mlp_grads if inp.activation_checkpointing else 0),
        recompute + sampled + mlp_grads, gather_buffer))

    # -- topology update: one decoder layer at a time (SeftMethod.layer_groups)
    if sf.window_scores == "dense":
        upd = add("topology update scratch", "update", DENSE_UPDATE_B * (n_shard // nl),
                  f"Σ_layer targets numel/W · {DENSE_UPDATE_B} B")
    else:
        k_layer = sum(caps)
        cand_layer = sum(math.ceil((k + _non_slot_candidates(sf, k, r * c, inp.nm)) / W)
                         for (_, r, c), k in zip(targets, caps))
        upd = add("topology update scratch", "update", UPDATE_B * cand_layer + UPDATE_RANK_B * k_layer,
                  f"Σ_layer (K + non-slot candidates)/W · {UPDATE_B} B + Σ_layer K · {UPDATE_RANK_B} B")
    if zero is not None:
        # refresh after θ edits: a target ZeRO holds gathered is all-gathered again from its
        # partitions; counted for the largest target, an upper bound (only targets ZeRO still holds
        # gathered at the update are refreshed: measured 0.6-0.7 of this line at 2-3 CPU ranks)
        upd += add("ZeRO-3 refresh of a gathered target", "update", n_max * e,
                   f"largest target · {e} B (re-gathered after the update's θ edits)")

    gpu_resident = sum(x.bytes for x in lines if x.phase == "resident")
    cpu = theta + seft_state + scores + upd if offload else 0.0
    ckpt_acts = nl * ec * T * H + per_layer + final  # layer inputs + one layer recomputed

    # -- the same run with PEFT LoRA of the same rank (same backend, batch, sequence): θ, LoRA's
    # state, the same activations plus each target's x·Aᵀ, no SEFT kernel scratch or window
    r_lora = sf.lora_rank if sf.lora_rank is not None else max(1, round(sum(caps) / sum(a + b for _, a, b in targets)))
    lora_state = nl * sum(math.ceil(r_lora * (a + b) / W) for _, a, b in targets) * LORA_B
    lora_acts = acts + (nl if not inp.activation_checkpointing else 1) * len(targets) * T * r_lora * ec
    lora_peak = sum(x.bytes for x in lines if x.name in ("θ shard", "ZeRO-3 persistent params")) \
        * (0 if offload else 1) + lora_state + max(
            lora_acts - final + gw_fwd,
            lora_acts + gw_bwd + max(logits, recompute + mlp_grads, gather_buffer))
    return MemoryPlan(
        inp, lines,
        step_peak=gpu_resident + step_peak,
        window_peak=gpu_resident + window_peak + (0 if offload else scores),
        update_peak=gpu_resident + (0 if offload else scores + upd),
        num_params=s.num_params(), target_numel=nl * sum(r * c for _, r, c in targets),
        slots=nl * sum(caps), cpu_bytes_per_rank=cpu + edits, checkpointed_activations=ckpt_acts,
        lora_peak=lora_peak, lora_rank=r_lora)


def smallest_world(inp: PlanInput, gpu_gib: float, step: int, limit: int = 4096) -> Optional[int]:
    """The smallest multiple of `step` ranks at which the plan fits (None up to `limit`)."""
    sizes = [1] if inp.backend == "local" else range(step, limit + 1, step)
    for w in sizes:
        if plan_memory(dataclasses.replace(inp, world=w)).peak <= usable_bytes(gpu_gib):
            return w
    return None


def format_plan(plan: MemoryPlan, gpu: Optional[str] = None, gpu_gib: Optional[float] = None) -> str:
    i = plan.inp
    unit, div = ("GiB", GIB) if plan.peak >= GIB else ("MiB", 1 << 20)
    out = [f"{plan.num_params / 1e9:.3g}B parameters, {plan.target_numel / 1e9:.3g}B in target "
           f"matrices, K = {plan.slots / 1e6:.3g}M slots; backend {i.backend}, W = {i.world}, "
           f"θ {i.dtype}, compute {i.compute_dtype}, micro-batch {i.micro_batch} x {i.seq_len} tokens",
           "", f"  {'per GPU, worst rank':40s} {unit:>9s}  {'phase':9s} formula"]
    out += [f"  {x.name:40s} {x.bytes / div:9.3f}  {x.phase:9s} {x.formula}" for x in plan.lines]
    out += ["", f"  {'peak of a training step':40s} {plan.step_peak / div:9.3f}",
            f"  {'peak of a selection-window step':40s} {plan.window_peak / div:9.3f}",
            f"  {'peak of a topology update':40s} {plan.update_peak / div:9.3f}",
            f"  {'PEAK':40s} {plan.peak / div:9.3f}",
            f"  {f'PEFT LoRA r={plan.lora_rank}, same run (LoRA line)':40s} {plan.lora_peak / div:9.3f}"
            f"  SEFT / LoRA = {plan.peak / plan.lora_peak:.2f}",
            (f"  train.activation_checkpointing: true would keep activations at "
             f"{plan.checkpointed_activations / div:.3f} {unit} instead of "
             f"{plan.get('activations') / div:.3f}" if not i.activation_checkpointing else
             "  activation checkpointing on")]
    if plan.cpu_bytes_per_rank:
        out.append(f"  host memory (θ-edit bitmap; offloaded θ + SEFT state): "
                   f"{plan.cpu_bytes_per_rank / GIB:.2f} GiB per rank, "
                   f"{plan.cpu_bytes_per_rank * i.gpus_per_node / GIB:.1f} GiB per node")
    if gpu_gib is not None:
        usable = usable_bytes(gpu_gib)
        out.append(f"\n{gpu or 'GPU'}: {gpu_gib:g} GiB, usable {usable / GIB:.1f} GiB "
                   f"(-{HEADROOM_GIB:g} GiB context/NCCL, x{FRAGMENTATION:g} for fragmentation): "
                   f"{'FITS' if plan.peak <= usable else 'DOES NOT FIT'} "
                   f"(peak = {plan.peak / usable:.0%} of usable)")
    return "\n".join(out)


def read_shape(run_yaml: str, preset: Optional[Preset]) -> ModelShape:
    """A run's shape: its model.path's config.json if it is here, else the preset, else the
    run's model.tiny. A preset that disagrees with the config.json is an error."""
    cfg = load_config(run_yaml, check_paths=False)
    if not cfg.model.path:
        if preset is not None:
            raise ConfigError(f"--preset: {run_yaml} builds its random model from model.tiny; "
                              "drop --preset or set model.path")
        t = cfg.model.tiny
        return ModelShape(t.hidden_size, t.intermediate_size, t.num_hidden_layers,
                          t.num_attention_heads, t.num_key_value_heads, t.vocab_size,
                          t.max_position_embeddings)
    p = Path(cfg.model.path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path(run_yaml).resolve().parent / p]
    found = next((c / "config.json" for c in candidates if (c / "config.json").is_file()), None)
    if found is None:
        if preset is None:
            raise ConfigError(f"model.path: {cfg.model.path} has no config.json here; pass --preset "
                              "configs/models/<model>.yaml for its shape")
        return preset.shape
    shape = ModelShape.from_hf(json.loads(found.read_text()), str(found))
    if preset is not None and shape != preset.shape:
        diff = [f.name for f in dataclasses.fields(shape)
                if getattr(shape, f.name) != getattr(preset.shape, f.name)]
        raise ConfigError(f"--preset {preset.path}: {', '.join(diff)} differ from {found}")
    return shape
