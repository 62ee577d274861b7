"""DeepSpeed ZeRO stage 3: θ frozen and partitioned, SEFT state co-partitioned with it.

    deepspeed --num_gpus N launch/train.py --ds_config configs/ds/zero3.json --config RUN.yaml ...
    torchrun --nproc_per_node N launch/train.py --backend zero3 --config RUN.yaml ...

Layout. A model folder is loaded on every rank by `from_pretrained` under `HfDeepSpeedConfig`:
transformers builds it inside `zero.Init` and loads each checkpoint shard into the partitions, so
no rank ever holds it whole. A run that builds or prunes its start model (the tiny random model,
in-run pruning) does that in memory on rank 0 only, as the local backend would (train.py saves it
as <out>/pruned); the other ranks get a meta skeleton, and `attach` builds the partitioned model
under `zero.Init` and fills it from rank 0 one parameter at a time. ZeRO flattens each parameter,
pads it to world·ps and gives rank r `p.ds_tensor` = [r·ps, (r+1)·ps).
A target's SparseDelta wraps the true (unpadded) part of that partition as a writable view, at
offset r·ps: its mask, slots, scores and window gradient live in the same layout, so per-rank
SEFT state is O(n/W + K/W). There is no fp32 master copy (no engine optimizer), so writing the
view is writing θ.

Forward/backward. ZeRO's module hooks gather a target's weight for its forward and backward; the
forward adds the full (pos, δ) gathered from the slots' owners (dist.gather_slots, one matrix at
a time), whose backward sums the δ-gradients over ranks onto the owners. In selection windows the
dense G of a matrix is reduce-scattered in fp32 straight into the partition layout and added to
`grad_acc`; no rank keeps another layer's G.

What goes through DeepSpeed's engine and what does not (deepspeed 0.19.8; errors seen here):
* `deepspeed.initialize(model=...)` with every parameter frozen builds no optimizer but a
  `DeepSpeedZeRoOffload` (engine.py ~line 680): the partition coordinator and the gather/release
  hooks on every module, param offload, and the checks of the batch settings. We use exactly that.
* `engine.backward(loss)` fails in its prologue: "AttributeError: 'DeepSpeedZeRoOffload' object
  has no attribute 'set_gradient_accumulation_boundary'"; and a plain `loss.backward()` on an
  `engine(...)` output is refused: "RuntimeError: Direct calls to tensor.backward() are not
  supported in this configuration". So the forward calls `engine.module` (the same ZeRO hooks,
  without the engine's output hooks) and the loop calls `loss.backward()`.
* The engine cannot own the slots: with no trainable engine parameter a client torch optimizer
  is empty ("optimizer got an empty parameter list"), and δ as engine parameters would be
  re-partitioned by ZeRO's own flat layout (not with θ) into buffers that cannot change size at
  every topology update. SlotAdamW updates each rank's slots.
* Hence accumulation, clipping and bf16 are *read from* the ds config but executed by the loop:
  `gradient_accumulation_steps`, `train_micro_batch_size_per_gpu`, `train_batch_size`,
  `gradient_clipping` and `bf16.enabled` must agree with train.grad_accum, train.micro_batch_size
  (x world), train.max_grad_norm and model.dtype; "auto" or a missing key takes the run config's
  value; a conflict is a ConfigError naming both keys (`load_ds_config`). bf16 is real bf16
  weights (zero.Init's dtype), with fp32 slots, fp32 window gradients and fp32 optimizer state.
* `engine.save_checkpoint` fails without an optimizer: "AttributeError: 'NoneType' object has no
  attribute 'makedirs'" (its checkpoint engine is configured only with an optimizer); configured
  by hand: "AttributeError: 'DeepSpeedZeRoOffload' object has no attribute 'fp16_groups'". It
  would hold nothing we need (θ is frozen; its edits are in our state), and its frozen fragments
  are θ without the deltas, i.e. exactly the silently wrong model zero_to_fp32.py must not give.
  Checkpoints are therefore only our per-rank safetensors (checkpoint.save_checkpoint, keyed by
  matrix name and flat offset, reloadable at any world size). DeepSpeed's zero_to_fp32.py stops
  on them with "can't find *_model_states.pt files" and writes nothing; the README.md the
  trainer writes into checkpoints/ says how to get the weights (export/, launch/export.py --run).

Export goes through the consolidated state dict (`save_pretrained`): `full_matrices` gathers one
target at a time with modifier_rank=0, so what export's merge writes into the weight on rank 0
becomes every rank's partition; then DeepSpeed consolidates one module at a time into rank 0's
host memory and rank 0 writes the same HF folder as the local backend.

Persistent parameters (numel <= stage3_param_persistence_threshold) keep a resident full copy
after the first step, and so may params ZeRO keeps live; `base_changed` re-gathers every target
that is resident from the partitions after θ is edited (merge, adapt, resume), so the forward
never sees a stale θ.

ZeRO-Offload. `offload_param: {device: cpu}` (configs/ds/zero3_offload.json) keeps θ's partitions
in host memory; the SEFT state of a matrix follows its partition (SparseDelta tensors live on
`base.device`); collectives run on the communication device. `offload_optimizer` is refused:
the engine has no optimizer state to offload (the slot optimizer state is 3 fp32 + 1 int64 per
slot, O(K/W) per rank), and NVMe param offload is refused because the SEFT views need the
partitions in memory.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from seft_scale.backends import set_grad_capture
from seft_scale.backends.dist import (gather_slots, init_distributed, make_allreduce, peer_guard,
                                      reduce_scatter_flat)
from seft_scale.config import ConfigError, ModelConfig, RunConfig
from seft_scale.delta import SparseDelta, SparseDeltaLinear
from seft_scale.model import build_tiny_llama, load_model, resolve_attn, resolve_dtype

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ds" / "zero3.json"


def _skip_shm_op_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op at every init_distributed on CPU (~60 s,
    platform.md); we use torch.distributed collectives only."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _set_omp_threads() -> None:
    """The deepspeed launcher does not set OMP_NUM_THREADS (torchrun sets 1); unset, each rank
    would start one thread per core and oversubscribe the machine. Use cores / local ranks."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    threads = max(1, len(os.sched_getaffinity(0)) // max(local, 1))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"zero3: OMP_NUM_THREADS was unset; using {threads} threads per rank "
              f"(cores / {local} local ranks)")


def _compute_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_ds_config(source, cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed config for this run, validated against the run config before any heavy work.

    Keys the loop executes itself take "auto" (or absence) as "the run config's value"; an
    explicit value must equal the run config's, else a ConfigError names both keys."""
    if isinstance(source, dict):
        ds = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"--ds_config: {source} does not exist")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"--ds_config: {source} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError("--ds_config: expected a JSON object")

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--ds_config {key}: {msg}")

    zero = ds.setdefault("zero_optimization", {})
    need(zero.get("stage") == 3, "zero_optimization.stage",
         f"the zero3 backend runs ZeRO stage 3, got {zero.get('stage')!r}")
    for key in ("optimizer", "scheduler"):
        need(key not in ds, key, "θ is frozen and has no DeepSpeed optimizer; SEFT's slot AdamW "
             "trains the deltas with train.lr / train.lr_schedule: remove this section")
    need(not (ds.get("fp16") or {}).get("enabled", False), "fp16.enabled",
         "fp16 is not supported (no loss scaling of the slot gradients); use bf16 or fp32")
    need((zero.get("offload_optimizer") or {}).get("device", "none") == "none",
         "zero_optimization.offload_optimizer", "the engine holds no optimizer state to offload "
         "(the slot optimizer state is O(K/world) per rank, next to the slots): remove it")
    need((zero.get("offload_param") or {}).get("device", "none") in ("none", "cpu"),
         "zero_optimization.offload_param.device",
         "only 'cpu' (or 'none'): SEFT edits θ's partitions in place and needs them in memory")

    t = cfg.train
    dtype = resolve_dtype(cfg.model.dtype, _compute_device())
    if dtype == torch.float16:
        raise ConfigError("model.dtype: float16 is not supported by the zero3 backend; use "
                          "bfloat16 or float32")
    shared = [
        ("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", t.grad_accum, "train.grad_accum"),
        ("train_batch_size", t.micro_batch_size * t.grad_accum * world,
         f"train.micro_batch_size x train.grad_accum x world ({world})"),
        ("gradient_clipping", t.max_grad_norm, "train.max_grad_norm"),
    ]
    for key, value, run_key in shared:
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif isinstance(given, bool) or not isinstance(given, (int, float)) or given != value:
            raise ConfigError(f"--ds_config {key}={given!r} conflicts with {run_key}={value!r}: "
                              "make them equal or write \"auto\"")
    bf16 = ds.setdefault("bf16", {})
    given = bf16.get("enabled", "auto")
    if given == "auto":
        bf16["enabled"] = dtype == torch.bfloat16
    elif bool(given) != (dtype == torch.bfloat16):
        raise ConfigError(f"--ds_config bf16.enabled={given!r} conflicts with model.dtype="
                          f"{cfg.model.dtype!r} ({str(dtype).removeprefix('torch.')} here): "
                          "make them agree or write \"auto\"")
    ds.setdefault("steps_per_print", 1 << 30)  # the engine never steps; keep its log quiet
    return ds


def _input_requires_grad(module: nn.Module, args: tuple):
    """ZeRO-3 releases a module's gathered weight after its backward through a hook on the
    module's inputs that require grad. θ and the embeddings are frozen, so the first targets'
    inputs do not: their weights would stay gathered after backward, and the next gather
    context fails ("Cannot free a ZeRO-3 parameter while it is still active in submodules").
    A leaf input that requires grad costs one input-gradient matmul for those few targets."""
    if torch.is_grad_enabled() and args and torch.is_tensor(args[0]) and not args[0].requires_grad:
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:])
    return None


class Zero3Backend:
    """The Backend protocol (seft_scale/backends/__init__.py) over DeepSpeed ZeRO stage 3."""

    def __init__(self, cfg: RunConfig, ds_config=None):
        _set_omp_threads()
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.ds_config = load_ds_config(ds_config or DEFAULT_DS_CONFIG, cfg, world)
        if cfg.eval.ppl_data or cfg.eval.tasks:  # at any world size: no process holds the model
            raise ConfigError("eval: in-run evaluation needs the whole model in one process and "
                              "the zero3 backend partitions it; evaluate the export with "
                              "launch/evaluate.py")
        self.builds_start = cfg.prune.method != "none" or not cfg.model.path  # as train.py
        _skip_shm_op_build()
        import deepspeed

        self.rank, self.world, _ = init_distributed()
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the group above
        self.device = _compute_device()
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        self.allreduce = make_allreduce()
        self.model: Optional[nn.Module] = None
        self.engine = None
        self._model_cfg: Optional[ModelConfig] = None
        self._hf_ds_config = None  # transformers keeps only a weak reference: hold it
        self._params: dict[str, nn.Parameter] = {}
        self._modules: dict[str, SparseDeltaLinear] = {}
        self._bounds: dict[str, list[tuple[int, int]]] = {}  # every rank's true flat range

    def barrier(self) -> None:
        with peer_guard(self.rank, "a barrier"):
            dist.barrier()

    # -- model construction --------------------------------------------------------------------
    def _zero3_on(self) -> None:
        from transformers.integrations import HfDeepSpeedConfig
        if self._hf_ds_config is None:
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def load_model(self, cfg: ModelConfig, train_text: Optional[str] = None,
                   path: Optional[str] = None):
        """A folder (`path`, or model.path when nothing is pruned here): partitioned by
        from_pretrained under zero.Init on every rank. Otherwise the start is built in memory on
        rank 0 (on this rank's device, as the local backend builds it) and a meta skeleton
        elsewhere; `attach` partitions it."""
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        self._model_cfg = cfg = dataclasses.replace(
            cfg, dtype=str(dtype).removeprefix("torch."),
            attn_implementation=resolve_attn(cfg.attn_implementation, self.device))
        if path or not self.builds_start:
            self._zero3_on()
            with peer_guard(self.rank, "loading the model"):
                model, tok = load_model(cfg, self.device, train_text, path)
            self._check_dtype(model)
            return model, tok
        model, tok = load_model(cfg, self.device, train_text) if self.rank == 0 else (None, None)
        shared = [tok]
        with peer_guard(self.rank, "loading the model"):
            dist.broadcast_object_list(shared, src=0)  # one tokenizer for every rank's data
        tok = shared[0]
        if self.rank != 0:
            with torch.device("meta"):
                if cfg.path:
                    from transformers import AutoConfig, AutoModelForCausalLM
                    config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
                    model = AutoModelForCausalLM.from_config(
                        config, dtype=dtype, attn_implementation=cfg.attn_implementation,
                        trust_remote_code=cfg.trust_remote_code)
                else:
                    model = build_tiny_llama(cfg, len(tok), dtype, cfg.attn_implementation)
            model.config.use_cache = False
        return model, tok

    def _check_dtype(self, model: nn.Module) -> None:
        want = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        got = {p.ds_tensor.dtype for p in model.parameters()}
        if got != {want}:  # zero.Init's dtype precedence has surprised us before (platform.md)
            raise RuntimeError(f"zero3: partitions were built as {got}, expected {want}")

    @torch.no_grad()
    def _partition(self, plain: nn.Module) -> nn.Module:
        """The same model built under zero.Init, filled from rank 0's weights one parameter at a
        time (modifier_rank=0 broadcasts and re-partitions)."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters
        from transformers import AutoModelForCausalLM

        self._zero3_on()
        cfg = self._model_cfg
        model = AutoModelForCausalLM.from_config(plain.config, dtype=getattr(torch, cfg.dtype),
                                                 trust_remote_code=cfg.trust_remote_code)
        model.config.use_cache = False
        source = dict(plain.named_parameters()) if self.rank == 0 else {}
        for name, p in model.named_parameters():
            with GatheredParameters([p], modifier_rank=0):
                if self.rank == 0:
                    p.data.copy_(source[name].data)
        source = dict(plain.named_buffers()) if self.rank == 0 else {}
        for name, b in model.named_buffers():
            if self.rank == 0:
                b.copy_(source[name])
            dist.broadcast(b, src=0)
        plain.to("meta")  # rank 0 keeps one copy of the model: its partitions
        self._check_dtype(model)
        return model

    def attach(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]],
               kernel_for: Callable[[tuple[int, int]], str]) -> list[SparseDelta]:
        import deepspeed

        with peer_guard(self.rank, "partitioning the model"):
            if not all(hasattr(p, "ds_tensor") for p in model.parameters()):
                model = self._partition(model)
            for p in model.parameters():
                p.requires_grad_(False)
            self.engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)
        self.model = self.engine.module  # ZeRO's hooks are on the module; see the docstring
        modules = dict(self.model.named_modules())
        deltas = []
        for name, _ in targets:
            lin, p = modules[name], modules[name].weight
            numel, part = p.ds_numel, p.ds_tensor.numel()
            bounds = [(min(r * part, numel), min((r + 1) * part, numel)) for r in range(self.world)]
            lo, hi = bounds[self.rank]
            d = SparseDelta(name, tuple(p.ds_shape), lo, p.ds_tensor.data[: hi - lo],
                            budget=-1, capacity=-1)
            SparseDeltaLinear.attach(lin, partial(self._full_slots, d), kernel_for(d.shape))
            lin.register_forward_pre_hook(_input_requires_grad, prepend=True)
            self._params[name], self._modules[name], self._bounds[name] = p, lin, bounds
            deltas.append(d)
        return deltas

    # -- training --------------------------------------------------------------------------------
    def _full_slots(self, d: SparseDelta):
        return gather_slots(d.pos.to(self.comm_device), d.values.to(self.comm_device))

    def set_dense_grad_capture(self, deltas: Sequence[SparseDelta], on: bool) -> None:
        set_grad_capture(self._modules, deltas, on, lambda d, G: reduce_scatter_flat(
            G.to(self.comm_device, torch.float32), self._bounds[d.name]))

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        with peer_guard(self.rank, "a forward/backward"):
            out = self.model(**batch)
            (out.loss * scale).backward()
        return out.loss.detach()

    @torch.no_grad()
    def base_changed(self, deltas: Sequence[SparseDelta]) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for d in deltas:
            p = self._params[d.name]
            if p.ds_status != ZeroParamStatus.AVAILABLE:
                continue  # the next gather reads the edited partitions
            full = torch.empty(p.ds_tensor.numel() * self.world, dtype=p.dtype, device=self.comm_device)
            with peer_guard(self.rank, "refreshing a resident weight"):
                dist.all_gather_into_tensor(full, p.ds_tensor.to(self.comm_device))
            p.data.copy_(full[: p.ds_numel].view_as(p.data))

    # -- export ----------------------------------------------------------------------------------
    def full_matrices(self, deltas: Sequence[SparseDelta]):
        """One matrix at a time, gathered with modifier_rank=0: rank 0 gets W = θ + S and the
        mask, and what it writes into the weight (export's merge) becomes every rank's θ."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        for d in deltas:
            p = self._params[d.name]
            with peer_guard(self.rank, "gathering a matrix for export"):
                pos, values = self._full_slots(d)
                mask = self._gather_flat(d.mask.to(torch.uint8), d.name).bool()
            with GatheredParameters([p], modifier_rank=0):
                if self.rank != 0:
                    yield d, None, None
                    continue
                w = p.data.detach().reshape(-1).to(torch.float32).clone()
                w.index_add_(0, pos.to(w.device), values.detach().to(w.device))
                yield d, w.view(d.shape), mask.view(d.shape)

    def _gather_flat(self, local: torch.Tensor, name: str) -> torch.Tensor:
        bounds = self._bounds[name]
        width = max(hi - lo for lo, hi in bounds)
        padded = torch.zeros(width, dtype=local.dtype, device=self.comm_device)
        padded[: len(local)] = local
        out = torch.empty(width * self.world, dtype=local.dtype, device=self.comm_device)
        dist.all_gather_into_tensor(out, padded)
        return torch.cat([out[r * width: r * width + hi - lo] for r, (lo, hi) in enumerate(bounds)])

    def export_model(self, model: nn.Module, start_dir) -> nn.Module:
        return self.model  # merged in place, partition by partition (full_matrices)

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        """Every rank: DeepSpeed consolidates the state dict one module at a time into rank 0's
        host memory (the source of its save_16bit_model); rank 0 writes the HF folder."""
        with peer_guard(self.rank, "consolidating the model for export"):
            state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank == 0:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        self.barrier()
