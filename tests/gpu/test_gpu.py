"""On CUDA, in bf16, on small random Llamas built offline (nothing downloads):

* attention: sdpa is the implementation a run resolves when flash-attn is not installed, and the
  sdpa backend torch actually ran (flash / efficient / cudnn / math, read off the profiler's aten
  ops and CUDA kernels) is recorded, at the tiny model's head size and at Llama-7B's (128);
* every SEFT kernel (seft.kernel sddmm and dense, and the selection window's dense and sampled
  taps) gives the output, input gradient and δ-gradients of a dense fp64 reference within bf16
  tolerance, and θ is restored bit for bit after the forward and after the backward;
* every method of seft_scale.methods.METHODS trains through train() on the GPU, keeps the exact
  budget after every step and in the export, resumes from a checkpoint with its state (slots or
  parameters, optimizer moments) on the parameters' device, and ends bit-identical to the run
  that was never interrupted; the export reloads onto the GPU with the reported nonzeros.

Skipped without CUDA. `bash launch/gpu_check.sh` runs these with SEFT_GPU_FACTS set, so what they
saw (versions, device, attention backend, nondeterministic ops) lands in its JSON report.
"""
import contextlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from seft_scale.config import ModelConfig, TinyModelConfig, resolve_dtype
from seft_scale.methods import METHODS
from seft_scale.model import find_targets, load_model
from seft_scale.seft.kernels import KERNELS, SDDMM_BLOCK_BYTES, linear_sparse_delta
from tests.conftest import ROOT
from tests.gpu.support import has_module, sdpa_backends
from tests.helpers import train_tiny
from tests.seft.test_kernels import LocalSlots, RecordingTap

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA is not available: the GPU checks run on a CUDA machine (bash launch/gpu_check.sh)")]

CUDA = torch.device("cuda")
TEXT = (ROOT / "configs" / "data" / "tempest.txt").read_text()[:40000]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """‖got - ref‖ / ‖ref‖ in fp64; NaN or Inf anywhere never passes."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (8, 8, 128)],
                         ids=["tiny-gqa-dim16", "llama7b-heads-dim128"])
def test_attention_is_sdpa_without_flash_attn_and_the_backend_is_recorded(heads, kv_heads, head_dim,
                                                                          gpu_facts):
    shape = TinyModelConfig(hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim,
                            num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            vocab_size=256, max_position_embeddings=1024)
    model, _ = load_model(ModelConfig(tiny=shape), CUDA, train_text=TEXT)  # dtype, attention: auto
    want = "flash_attention_2" if has_module("flash_attn") else "sdpa"
    assert model.config._attn_implementation == want
    assert next(model.parameters()).dtype == resolve_dtype("auto", CUDA) == torch.bfloat16
    ids = torch.randint(model.config.vocab_size, (2, 512), device=CUDA)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        model(input_ids=ids, labels=ids).loss.backward()  # a training step's attention, both ways
        torch.cuda.synchronize()
    seen = sdpa_backends(prof)
    gpu_facts.setdefault("attention", {})[f"heads{heads}-kv{kv_heads}-dim{head_dim}"] = {
        "implementation": want, **seen}
    if want == "sdpa":
        assert seen["backends"], f"no sdpa op in the profile: {seen}"


# -------------------------------------------------------------------------------- kernels

# every kernel outside windows; in a window the SDDMM path with a dense G or sampled candidates
CASES = [(k, None) for k in KERNELS] + [("sddmm", "dense"), ("sddmm", "sampled")]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kernel,tap", CASES, ids=[f"{k}-{t or 'no-window'}" for k, t in CASES])
def test_kernel_matches_a_dense_reference_in_bf16_and_restores_theta(kernel, tap, seed):
    d_out, d_in, k = 384, 640, 4000
    tokens = 3000  # more than one SDDMM token block at d_in = 640
    assert tokens > SDDMM_BLOCK_BYTES // (4 * d_in)
    g = torch.Generator().manual_seed(seed)
    w64 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.02
    w64[torch.rand(d_out, d_in, generator=g) < 0.5] = 0
    pos = torch.randperm(d_out * d_in, generator=g)[:k].sort().values
    vals = torch.randn(k, generator=g) * 0.01
    x = torch.randn(2, tokens // 2, d_in, generator=g).to(torch.bfloat16)
    g_out = torch.randn(2, tokens // 2, d_out, generator=g).to(torch.bfloat16)
    sample = torch.randperm(d_out * d_in, generator=g)[:3 * k].sort().values  # overlaps the slots
    w = w64.to(CUDA, torch.bfloat16)
    theta = w.clone()

    # reference: fp64 on the CPU, from the very bf16 / fp32 values the kernel gets
    dense = torch.zeros(d_out * d_in, dtype=torch.float64)
    dense[pos] = vals.double()
    dense.requires_grad_(True)
    xr = x.double().requires_grad_(True)
    y_ref = F.linear(xr, w.double().cpu() + dense.view(d_out, d_in))
    y_ref.backward(g_out.double())
    G_ref = (g_out.double().reshape(-1, d_out).t() @ x.double().reshape(-1, d_in))

    xs = x.to(CUDA).requires_grad_(True)
    vs = vals.to(CUDA).requires_grad_(True)
    recorder = None if tap is None else RecordingTap(tap == "dense", sample.to(CUDA))
    y = linear_sparse_delta(xs, w, None, vs, LocalSlots(pos.to(CUDA), vs), kernel, recorder)
    assert torch.equal(w, theta), "θ not restored after the forward"
    y.backward(g_out.to(CUDA))
    torch.cuda.synchronize()
    assert torch.equal(w, theta), "θ not restored after the backward"
    assert vs.grad.dtype == torch.float32 and vs.grad.device.type == "cuda"

    # bf16 outputs: within 1e-2; δ-gradients summed in fp32 by the SDDMM: within 1e-3 (the dense
    # kernel reads them off a bf16 G); see the module docstring of seft_scale/seft/kernels.py
    errors = {"y": rel_err(y, y_ref), "grad_x": rel_err(xs.grad, xr.grad),
              "grad_delta": rel_err(vs.grad, dense.grad[pos])}
    bounds = {"y": 1e-2, "grad_x": 1e-2,
              "grad_delta": 1e-3 if kernel == "sddmm" and tap != "dense" else 1e-2}
    if tap is not None:
        assert len(recorder.seen) == 1
        want = G_ref if tap == "dense" else G_ref.reshape(-1)[sample]
        errors["window"] = rel_err(recorder.seen[0], want)
        bounds["window"] = 1e-2 if tap == "dense" else 1e-3
    bad = {key: err for key, err in errors.items() if not err <= bounds[key]}
    assert not bad, f"relative errors {errors} over the bounds {bounds}"


# -------------------------------------------------------------------------------- methods

@contextlib.contextmanager
def deterministic(facts: dict):
    """Deterministic kernels for the comparison of two runs: some CUDA backward kernels sum with
    atomics in an order that varies from run to run (PyTorch's reproducibility notes), which would
    differ in the last bits whether or not the run was resumed. warn_only: an op without a
    deterministic version warns instead of failing the run; those warnings go into `facts`, also
    when the block fails (they are the first thing to read then)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(False)
            facts["nondeterministic_ops"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                                    if "deterministic" in str(w.message)})


def state_tensors_of(method) -> dict[str, torch.Tensor]:
    """A method's trainable values and optimizer state (not torch AdamW's `step` counts, which
    torch itself keeps on the CPU)."""
    if hasattr(method, "deltas"):  # SEFT: the slots of every matrix
        return {f"{d.name}/{f}": getattr(d, f) for d in method.deltas
                for f in ("pos", "values", "exp_avg", "exp_avg_sq", "age", "since_grown")}
    out = {f"param/{n}": p for n, p in method.params}
    for n, p in method.params:
        out.update({f"opt/{n}/{k}": v for k, v in method.opt.state.get(p, {}).items() if k != "step"})
    return out


def strip_timing(path):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "step_time_s")}
            for line in path.read_text().splitlines()]


RUNS = [(m, ()) for m in METHODS] + [("seft", ("seft.window_scores=dense",))]
RUN_IDS = [m + "".join(f"-{o.split('=')[1]}" for o in e) for m, e in RUNS]


@pytest.mark.parametrize("method,extra", RUNS, ids=RUN_IDS)
def test_method_trains_keeps_the_budget_resumes_bit_identical_and_exports(
        method, extra, tiny_yaml, tmp_path, monkeypatch, txt_data, gpu_facts):
    cls = METHODS[method]
    overrides = [f"method={method}", "train.checkpoint_every=8", "eval.plots=false",
                 f"data.cache_dir={tmp_path / 'cache'}", *extra]
    if method == "lora_star":
        pytest.importorskip("peft")
    facts = gpu_facts.setdefault("methods", {}).setdefault(RUN_IDS[RUNS.index((method, extra))], {})
    seen = {"devices": set(), "loaded": []}
    real_after, real_load = cls.after_backward, cls.load

    def watched_after(self, step, lr):
        seen["devices"] |= {t.device.type for t in state_tensors_of(self).values()}
        return real_after(self, step, lr)
    monkeypatch.setattr(cls, "after_backward", watched_after)

    with deterministic(facts):
        a = train_tiny(tiny_yaml, tmp_path / "a", *overrides)
        start = load_file(str(tmp_path / "a" / "pruned" / "model.safetensors"))
        end = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
        report = json.loads((tmp_path / "a" / "report.json").read_text())["matrices"]
        assert a["sparsity"]["exact_budget"] and len(report) == 14
        changed = 0
        for name, m in report.items():
            before, after = start[f"{name}.weight"], end[f"{name}.weight"]
            assert after.dtype == torch.bfloat16, name
            # the budget as seft_scale/sparsity.py counts it: the support is exactly B; a supported
            # weight may round to exactly 0 in bf16 (nnz <= B), never a weight outside it
            assert int((before != 0).sum()) == m["budget"] == m["support"], name
            assert int((after != 0).sum()) == m["nnz"] <= m["budget"], name
            changed += int((before != after).sum())
        assert (changed == 0) == (method == "none"), f"{changed} weights changed"
        if method != "none":  # none runs no step: nothing to watch, crash or resume
            assert seen["devices"] == {"cuda"}, f"trainable / optimizer state on {seen['devices']}"

            calls = {"n": 0}

            def crashing_after(self, step, lr):
                calls["n"] += 1
                if calls["n"] == 19:  # between the checkpoints of steps 16 and 24 (and in a window)
                    raise RuntimeError("simulated crash")
                return watched_after(self, step, lr)

            def checked_load(self, ckpt):
                real_load(self, ckpt)
                devices = {k: t.device.type for k, t in state_tensors_of(self).items()}
                seen["loaded"].append(sorted(set(devices.values())))
                off = [k for k, d in devices.items() if d != "cuda"]
                assert not off, f"resumed state not on the parameters' device (cuda): {off[:5]}"
            monkeypatch.setattr(cls, "after_backward", crashing_after)
            monkeypatch.setattr(cls, "load", checked_load)
            with pytest.raises(RuntimeError, match="simulated crash"):
                train_tiny(tiny_yaml, tmp_path / "b", *overrides)
            assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000016"
            monkeypatch.setattr(cls, "after_backward", watched_after)
            train_tiny(tiny_yaml, tmp_path / "b", *overrides, resume=True)
            assert seen["loaded"] == [["cuda"]]

            wb = load_file(str(tmp_path / "b" / "export" / "model.safetensors"))
            diff = [k for k in end if not torch.equal(end[k], wb[k])]
            assert end.keys() == wb.keys() and not diff, f"resumed export differs in {diff[:5]}"
            last = "checkpoints/step_00000024/slots-rank00000.safetensors"
            sa, sb = load_file(str(tmp_path / "a" / last)), load_file(str(tmp_path / "b" / last))
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
            assert strip_timing(tmp_path / "a" / "metrics.jsonl") == \
                strip_timing(tmp_path / "b" / "metrics.jsonl")

    # the export on the GPU: a plain HF folder with the reported nonzeros, a finite loss
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "export")).to(CUDA)
    for name, lin in find_targets(model, [".*_proj"]):
        assert int((lin.weight != 0).sum()) == report[name]["nnz"], name
    ids = torch.randint(model.config.vocab_size, (1, 64), device=CUDA)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    facts.update(trained_on="cuda", exact_budget=True, weights_changed=changed,
                 supported_weights_rounded_to_zero=sum(m["budget"] - m["nnz"] for m in report.values()),
                 resume="no step to resume" if method == "none" else "bit-identical, state on cuda",
                 final_loss=a["final_loss"], val_loss=a["val_loss"])
