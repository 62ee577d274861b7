"""DeepSpeed ZeRO stage 3: θ frozen and partitioned, SEFT state co-partitioned with it.

    deepspeed --num_gpus N launch/train.py --ds_config configs/ds/zero3.json --config RUN.yaml ...
    torchrun --nproc_per_node N launch/train.py --backend zero3 --config RUN.yaml ...

Layout. A model folder is loaded on every rank by `from_pretrained` under `HfDeepSpeedConfig`:
transformers builds it inside `zero.Init` and loads each checkpoint shard into the partitions, so
no rank ever holds it whole. A run that builds or prunes its start model (the tiny random model,
in-run pruning) does that in memory on rank 0 only, as the local backend would (saved as
<out>/pruned); the other ranks get a meta skeleton, and `wrap` builds the partitioned model
under `zero.Init` and fills it from rank 0 one parameter at a time. ZeRO flattens each parameter,
pads it to world·ps and gives rank r `p.ds_tensor` = [r·ps, (r+1)·ps).
A target's shard is the true (unpadded) part of that partition as a writable view, at offset
r·ps: the method's slots, support and window scores live in the same layout. There is no fp32 master copy (no engine optimizer), so writing the
view is writing θ.

Forward/backward. ZeRO's module hooks gather a target's weight for its forward and backward, and
the method adds the delta (seft/method.py); window gradients are summed over ranks in fp32.

What goes through DeepSpeed's engine and what does not (deepspeed 0.19.8; errors seen here):
* `deepspeed.initialize(model=...)` with every parameter frozen builds no optimizer but a
  `DeepSpeedZeRoOffload` (deepspeed/runtime/engine.py): the partition coordinator and the gather/release
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

Export goes through the consolidated state dict (`save_pretrained`): the method merges the delta
into each rank's own partitions, DeepSpeed consolidates one module at a time into rank 0's host
memory, and rank 0 writes the same HF folder as the local backend.

Persistent parameters (numel <= stage3_param_persistence_threshold) keep a resident full copy
after the first step, and so may params ZeRO keeps live; `refresh` re-gathers every target that
is resident from the partitions after θ is edited (merge, adapt, resume), so the forward never
sees a stale θ.

ZeRO-Offload. `offload_param: {device: cpu}` (configs/ds/zero3_offload.json) keeps θ's partitions
in host memory; the SEFT state of a matrix follows its partition (SparseDelta tensors live on
`base.device`); collectives run on the communication device. `offload_optimizer` is refused:
the engine has no optimizer state to offload (the slot optimizer state is 3 fp32 + 1 int64 per
slot, O(K/W) per rank), and NVMe param offload is refused because the SEFT views need the
partitions in memory.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Optional, Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from seft_scale.backends.base import TargetShard
from seft_scale.backends.ds_config import default_ds_config, load_ds_config
from seft_scale.backends.comm import Comm, init_distributed
from seft_scale.config import ModelConfig, RunConfig
from seft_scale.errors import ConfigError
from seft_scale.model import load_model, load_on_rank0, resolve_attn


def _skip_shm_op_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op at every init_distributed on CPU (~60 s
    measured on 2 cores); we use torch.distributed collectives only."""
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
    """The Backend protocol (seft_scale/backends/base.py) over DeepSpeed ZeRO stage 3."""

    name, sharded = "zero3", True
    grad_dtype = torch.float32

    def __init__(self, cfg: RunConfig, ds_config=None):
        _set_omp_threads()
        world = int(os.environ.get("WORLD_SIZE", 1))
        self.ds_config = load_ds_config(ds_config or default_ds_config(), cfg, world)
        if cfg.eval.ppl_data or cfg.eval.tasks:  # at any world size: no process holds the model
            raise ConfigError("eval: in-run evaluation needs the whole model in one process and "
                              "the zero3 backend partitions it; evaluate the export with "
                              "seft-eval (launch/evaluate.py)")
        self.rank, self.world, _ = init_distributed()
        _skip_shm_op_build()
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the group above
        self.comm = Comm()
        self.device = _compute_device()
        self.engine = None
        self._model_cfg: Optional[ModelConfig] = None
        self._hf_ds_config = None  # transformers keeps only a weak reference: hold it
        self._params: dict[str, nn.Parameter] = {}

    def _zero3_on(self) -> None:
        if self._hf_ds_config is None:
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def load_model(self, cfg: ModelConfig, path: Optional[str] = None,
                   train_text: Optional[str] = None, for_edit: bool = False):
        """A folder to train as it is: partitioned by from_pretrained under zero.Init on every
        rank, so no rank ever holds it whole. A start built or pruned here (for_edit): in memory
        on rank 0 (on this rank's device, as the local backend builds it), a meta skeleton
        elsewhere; `wrap` partitions it."""
        dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        self._model_cfg = cfg = dataclasses.replace(
            cfg, dtype=str(dtype).removeprefix("torch."),
            attn_implementation=resolve_attn(cfg.attn_implementation, self.device))
        if not for_edit:
            self._zero3_on()
            with self.comm.guard("loading the model"):
                model, tok = load_model(cfg, self.device, train_text, path)
            self._check_dtype(model)
            return model, tok
        return load_on_rank0(cfg, self.device, self.comm, train_text, path)

    def _check_dtype(self, model: nn.Module) -> None:
        want = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
        got = {p.ds_tensor.dtype for p in model.parameters()}
        if got != {want}:  # zero.Init's dtype precedence has surprised us before
            raise RuntimeError(f"zero3: partitions were built as {got}, expected {want}")

    @torch.no_grad()
    def _partition(self, plain: nn.Module) -> nn.Module:
        """The same model built under zero.Init, filled from rank 0's weights one parameter at a
        time (modifier_rank=0 broadcasts and re-partitions)."""
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

    def wrap(self, model: nn.Module) -> nn.Module:
        with self.comm.guard("partitioning the model"):
            if not all(hasattr(p, "ds_tensor") for p in model.parameters()):
                model = self._partition(model)
            for p in model.parameters():
                p.requires_grad_(False)
            self.engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)
        return self.engine.module  # ZeRO's hooks are on the module; see the docstring

    def shards(self, model: nn.Module, targets: Sequence[tuple[str, nn.Linear]]) -> list[TargetShard]:
        out = []
        for name, lin in targets:
            p = lin.weight
            numel, part = p.ds_numel, p.ds_tensor.numel()
            bounds = [(min(r * part, numel), min((r + 1) * part, numel)) for r in range(self.world)]
            lo, hi = bounds[self.rank]
            out.append(TargetShard(name, tuple(p.ds_shape), lo, p.ds_tensor.data[: hi - lo], bounds, lin))
            lin.register_forward_pre_hook(_input_requires_grad, prepend=True)
            self._params[name] = p
        return out

    @torch.no_grad()
    def refresh(self, names: Sequence[str]) -> None:
        for name in names:
            p = self._params[name]
            if p.ds_status != ZeroParamStatus.AVAILABLE:
                continue  # the next gather reads the edited partitions
            part = p.ds_tensor.numel()
            full = self.comm.gather_flat(p.ds_tensor.reshape(-1), [part] * self.world)
            p.data.copy_(full[: p.ds_numel].view_as(p.data))

    def save_pretrained(self, model: nn.Module, tokenizer, out) -> None:
        """Every rank: DeepSpeed consolidates the state dict one module at a time into rank 0's
        host memory (the source of its save_16bit_model); rank 0 writes the HF folder."""
        with self.comm.guard("consolidating the model for export"):
            state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank == 0:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
        self.comm.wait("rank 0 writing the model")
