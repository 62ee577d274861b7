"""Every baseline (method static / lora_star / sqft / spp / none) ends with exactly the pruned
model's budget per matrix after merging — unstructured and N:M, in fp32 and bf16, and on a start
holding exact zeros inside its kept set — and resumes bit-identical from a checkpoint, its
optimizer state restored through optimizer.load_state_dict."""
import json

import pytest
import torch
from safetensors.torch import load_file

from seft_scale.baselines.static import StaticMethod
from seft_scale.config import load_config
from seft_scale.errors import ConfigError
from seft_scale.model import find_targets, load_model, save_model
from seft_scale.prune import prune_model
from seft_scale.prune.sequential import fit_budget
from seft_scale.train import train
from tests.conftest import ROOT

FAST = ["train.steps=6", "train.eval_batches=1", "train.check_invariants=true", "train.lr=1e-3",
        "eval.plots=false"]
TEXT = str(ROOT / "configs" / "data" / "tempest.txt")
BASELINES = ["static", "lora_star", "sqft", "spp"]
# learning rates large enough that 6 steps move the weights (LoRA*: the re-pruned support too)
LR = {"static": 1e-3, "lora_star": 5e-2, "sqft": 1e-2, "spp": 5e-2, "none": 1e-3}


def run(tiny_yaml, out, *overrides, resume=False, start_model=None):
    return train(load_config(tiny_yaml, FAST + list(overrides)), out, resume=resume, progress=False,
                 start_model=start_model)


def check_exact(out, start_dir, method, nm=None):
    start = load_file(str(start_dir / "model.safetensors"))
    end = load_file(str(out / "export" / "model.safetensors"))
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["sparsity"]["exact_budget"] and len(report["matrices"]) == 14
    changed = 0
    for name, m in report["matrices"].items():
        a, b = start[f"{name}.weight"], end[f"{name}.weight"]
        assert b.dtype == a.dtype  # exported in the model's dtype
        assert int((b != 0).sum()) == int((a != 0).sum()) == m["budget"] == m["nnz"], name
        if method != "lora_star":  # the support itself cannot move
            assert torch.equal(a != 0, b != 0), name
        if nm is not None:
            assert m["nm_valid"], name
        changed += int((a != b).sum())
    assert (changed == 0) == (method == "none")  # the baselines really trained
    return report


@pytest.mark.parametrize("method", BASELINES + ["none"])
def test_exact_budget_after_merge(tiny_yaml, tmp_path, method):
    run(tiny_yaml, tmp_path / method, f"method={method}", f"train.lr={LR[method]}")
    report = check_exact(tmp_path / method, tmp_path / method / "pruned", method)
    if method == "lora_star":  # re-pruning after the merge moves the support
        assert sum(m["reactivated"] for m in report["matrices"].values()) > 0


@pytest.fixture(scope="module")
def zeros_start(tmp_path_factory):
    """A tiny model pruned 2:4 by Wanda whose kept set then gets exact zeros (as a dequantised GGUF
    model has: SmolLM2's q_proj of layer 0 kept 165,888 positions, 7 of them 0), saved as a start."""
    cfg = load_config(str(ROOT / "configs/runs/tiny.yaml"),
                      ["prune.method=wanda", "prune.pattern=2:4", f"prune.calib_data={TEXT}",
                       "prune.nsamples=4", "prune.seqlen=64"])
    model, tok = load_model(cfg.model, torch.device("cpu"), train_text=open(TEXT).read())
    targets = find_targets(model, cfg.seft.targets)
    prune_model(model, tok, targets, cfg.prune, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, lin in targets:
            kept = (lin.weight != 0).reshape(-1).nonzero().squeeze(1)
            lin.weight.view(-1)[kept[torch.randperm(len(kept), generator=g)[:7]]] = 0
    folder = tmp_path_factory.mktemp("zeros") / "start"
    save_model(model, tok, folder)
    return folder


@pytest.mark.parametrize("method", BASELINES)
def test_nm_start_with_exact_zeros(tiny_yaml, tmp_path, zeros_start, method):
    """LoRA* used to re-prune to the pattern's count (2 of every 4) and stop after training with
    'q_proj: re-pruned to N nonzeros, budget N-7'; every method now ends at the start's budget."""
    out = tmp_path / method
    run(tiny_yaml, out, f"method={method}", f"train.lr={LR[method]}", "prune.method=wanda",
        "prune.pattern=2:4", f"prune.calib_data={TEXT}", "prune.nsamples=4", "prune.seqlen=64",
        start_model=zeros_start)
    check_exact(out, zeros_start, method, nm=(2, 4))


@pytest.mark.parametrize("method", BASELINES)
def test_bf16_on_cpu(tiny_yaml, tmp_path, method):
    out = tmp_path / method
    run(tiny_yaml, out, f"method={method}", f"train.lr={LR[method]}", "model.dtype=bfloat16")
    check_exact(out, out / "pruned", method)
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = load_file(str(ckpt / "slots-rank00000.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.endswith("/step"))


def test_static_bf16_keeps_an_fp32_master(tiny_yaml):
    """Steps far below half a bf16 ulp of the weights: AdamW on the bf16 weights loses them all,
    static's fp32 master keeps them, and the bf16 weight is the master rounded."""
    cfg = load_config(tiny_yaml, ["method=static", "model.dtype=bfloat16", "train.max_grad_norm=0"])
    model, _ = load_model(cfg.model, torch.device("cpu"), train_text=open(TEXT).read()[:20000])
    targets = find_targets(model, cfg.seft.targets)
    name, lin = targets[0]
    start = lin.weight.detach().clone()
    naive = torch.nn.Parameter(start.clone())
    naive.grad = torch.ones_like(naive)
    torch.optim.AdamW([naive], lr=1e-6, weight_decay=0).step()  # a 1e-6 step on |w| ~ 0.02
    assert (naive.detach() != start).float().mean() < 0.05  # (almost) every update rounded away

    class Backend:
        sharded, world, device = False, 1, torch.device("cpu")
    method = StaticMethod(cfg, Backend(), model, targets)
    x = torch.randn(3, lin.in_features, dtype=torch.bfloat16)
    lin(x).float().sum().backward()
    master = method.master[name]
    assert master.dtype == torch.float32 and lin.weight.grad is None and master.grad is not None
    method.after_backward(1, 1e-6)
    moved = master.detach() != start.float()
    assert moved.sum() > 0.9 * (start != 0).sum()  # the fp32 master took the steps
    assert torch.equal(lin.weight.detach(), master.detach().to(torch.bfloat16))
    assert not bool((master.detach() != 0)[start == 0].any())


@pytest.mark.parametrize("method", BASELINES)
def test_resumes_bit_identical(tiny_yaml, tmp_path, monkeypatch, method):
    real, loads = torch.optim.AdamW.step, []
    calls = {"n": 0}
    args = [f"method={method}", f"train.lr={LR[method]}", "train.checkpoint_every=2"]
    run(tiny_yaml, tmp_path / "a", *args)

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_yaml, tmp_path / "b", *args)
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    load_state_dict = torch.optim.Optimizer.load_state_dict

    def recording(self, state):  # the state goes through load_state_dict (device/dtype-correct)
        loads.append(len(state["state"]))
        return load_state_dict(self, state)
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict", recording)
    run(tiny_yaml, tmp_path / "b", *args, resume=True)
    assert loads and loads[0] > 0
    a = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_spp_groups_must_divide_d_out(tiny_yaml, tmp_path):
    with pytest.raises(ConfigError, match="baseline.spp_groups: 5 must divide d_out"):
        run(tiny_yaml, tmp_path / "spp", "method=spp", "baseline.spp_groups=5")


def test_sqft_keeps_no_mask(tiny_yaml):
    """SQFT's mask is computed from the base weight: no buffer, no n-sized tensor beside the model."""
    from seft_scale.baselines.sqft import SqftMethod
    cfg = load_config(tiny_yaml, ["method=sqft"])
    model, _ = load_model(cfg.model, torch.device("cpu"), train_text=open(TEXT).read()[:20000])
    before = {n: b.numel() for n, b in model.named_buffers()}

    class Backend:
        sharded, world, device = False, 1, torch.device("cpu")
    method = SqftMethod(cfg, Backend(), model, find_targets(model, cfg.seft.targets))
    assert {n: b.numel() for n, b in model.named_buffers()} == before
    weights = {lin.weight.numel() for _, lin in method.targets}
    assert not any(p.numel() in weights for _, p in method.params)


def test_lora_star_needs_its_re_pruner(tiny_yaml, tmp_path):
    """A start pruned elsewhere (prune.method none) names LoRA*'s re-pruner, or the config is refused
    before anything runs; never a silent fallback."""
    with pytest.raises(ConfigError, match="baseline.reprune: method lora_star re-prunes"):
        load_config(tiny_yaml, ["method=lora_star", "prune.method=none"])
    with pytest.raises(ConfigError, match="prune.calib_data: lora_star re-prunes with wanda"):
        load_config(tiny_yaml, ["method=lora_star", "prune.method=none", "baseline.reprune=wanda"])
    cfg = load_config(tiny_yaml, ["method=lora_star", "prune.method=none", "baseline.reprune=wanda",
                                  f"prune.calib_data={TEXT}"])
    assert cfg.prune.calib_data == str(ROOT / "configs/data/tempest.txt")
    load_config(tiny_yaml, ["method=seft", "prune.method=none"])  # only lora_star re-prunes


def test_lora_star_calibration_is_checked_before_training(tiny_yaml, tmp_path, zeros_start):
    with pytest.raises(ConfigError, match="nsamples × seqlen"):
        run(tiny_yaml, tmp_path / "l", "method=lora_star", "prune.method=wanda", f"prune.calib_data={TEXT}",
            "prune.nsamples=100000", "prune.seqlen=64", start_model=zeros_start)
    assert not (tmp_path / "l" / "metrics.jsonl").exists()


def test_fit_budget():
    scores = torch.tensor([[5., 4., 3., 2., 9., 8., 7., 6.]])
    nonzero = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    keep = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    # trim: the lowest-scored kept nonzero goes
    assert fit_budget(keep, scores, nonzero, 3, (2, 4)).int().tolist() == [[1, 0, 0, 0, 1, 1, 0, 0]]
    # a kept exact zero does not count; fill within the N:M room (group 1 has room for one)
    keep0 = torch.tensor([[1, 0, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    got = fit_budget(keep0, scores, nonzero, 4, (2, 4))
    assert got.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]] and int(got.sum()) == 4
    # unstructured: fill with the best nonzero positions left
    assert fit_budget(keep0, scores, nonzero, 5, None).int().tolist() == [[1, 0, 0, 0, 1, 1, 1, 1]]
    # ties go to the lower position
    flat = torch.ones(1, 8)
    assert fit_budget(torch.ones(1, 8, dtype=torch.bool), flat, torch.ones(1, 8, dtype=torch.bool), 3,
                      None).int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]]


def test_lora_methods_need_a_rank(tiny_yaml):
    with pytest.raises(ConfigError, match="baseline.lora_rank"):
        load_config(tiny_yaml, ["method=sqft", "seft.lora_rank=null", "seft.density=0.01"])
    with pytest.raises(ConfigError, match="baseline.lora_rank"):
        load_config(tiny_yaml, ["method=spp", "seft.lora_rank=null", "seft.density=0.01"])
