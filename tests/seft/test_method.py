"""SeftMethod (seft_scale/seft/method.py) on the local backend: budgets from the pruned weights,
a slot budget larger than the support refused by name, and the merge: θ + S written into the
shard, plain Linears again, and the report equal to the whole-matrix report of the merged weight;
the grown slots' lr ramp counted from the update that grew them."""
import copy

import pytest
import torch
from torch import nn

from seft_scale.backends.local import LocalBackend
from seft_scale.config import PruneConfig, SeftConfig
from seft_scale.errors import ConfigError
from seft_scale.seft.budget import slot_capacity
from seft_scale.seft.kernels import SparseDeltaLinear
from seft_scale.seft.optim import SlotAdamW
from seft_scale.sparsity import matrix_report
from tests.helpers import pruned_tiny_llama, seft_method

CPU = torch.device("cpu")
OPT = SlotAdamW(1e-3)


@pytest.fixture(scope="module")
def pruned():
    return {"unstructured": pruned_tiny_llama(), "2:4": pruned_tiny_llama("2:4")}


def test_budgets_and_capacities(pruned):
    model = copy.deepcopy(pruned["unstructured"])
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    method, _ = seft_method(LocalBackend(CPU), model, SeftConfig(lora_rank=2))
    assert len(method.deltas) == 14 and method.numel == sum(d.numel for d in method.deltas)
    for d in method.deltas:
        w = weights[d.name]
        assert d.budget == int((w != 0).sum()) == w.numel() // 2
        assert d.capacity == slot_capacity(tuple(w.shape), method.cfg.seft) == 2 * sum(w.shape)
        assert torch.equal(d.support(), (w != 0).reshape(-1)) and d.offset == 0
        assert isinstance(method.modules[d.name], SparseDeltaLinear)
    assert all(not p.requires_grad for p in model.parameters())  # θ is frozen
    method.init_state()
    assert method.local_counts() == (sum(d.budget for d in method.deltas),
                                     sum(d.capacity for d in method.deltas))
    method.check()


@pytest.mark.parametrize("seft, key, first", [
    (SeftConfig(lora_rank=6), "seft.lora_rank", "k_proj would get K=288 slots but has only 256"),
    (SeftConfig(lora_rank=None, density=0.6), "seft.density",
     "q_proj would get K=614 slots but has only 512"),
])
def test_more_slots_than_nonzeros_is_refused(pruned, seft, key, first):
    model = copy.deepcopy(pruned["unstructured"])
    with pytest.raises(ConfigError) as e:
        seft_method(LocalBackend(CPU), model, seft)
    assert str(e.value).startswith(f"{key}: model.layers.0.self_attn.{first} nonzeros")
    assert f"lower {key}" in str(e.value)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("with_start", [True, False])
def test_merge_writes_theta_plus_s_and_reports(pruned, tmp_path, pattern, with_start):
    model = copy.deepcopy(pruned[pattern])
    start_dir = None
    if with_start:
        start_dir = tmp_path / "start"
        model.save_pretrained(start_dir, safe_serialization=True)
    method, model = seft_method(LocalBackend(CPU), model, SeftConfig(lora_rank=2),
                                prune=PruneConfig(pattern=pattern))
    method.init_state()
    nm = PruneConfig(pattern=pattern).nm
    g = torch.Generator().manual_seed(1)
    expected, starts = {}, {}
    for d in method.deltas:
        starts[d.name] = d.base.detach().clone().view(d.shape)
        if nm is None:  # as after an update: a slot moved to a pruned position, adapt pruned one
            support = d.support()
            free = torch.nonzero(~support).reshape(-1)[0]
            slotted = torch.zeros_like(support)
            slotted[d.local_index()] = True
            unslotted = torch.nonzero(support & ~slotted).reshape(-1)[0]
            d.keep_slots(torch.arange(len(d.pos)) != 0)
            d.add_slots(free.reshape(1), *OPT.seed(torch.zeros(1), torch.zeros(1), 0))
            d.prune(unslotted.reshape(1))
        d.values = torch.randn(len(d.pos), generator=g).requires_grad_()
        w = d.base.detach().clone()
        w[d.local_index()] = (w[d.local_index()].to(torch.float32) + d.values.detach()).to(w.dtype)
        expected[d.name] = w.view(d.shape)
    supports = {d.name: d.support() for d in method.deltas}
    x = torch.randint(0, 64, (2, 9))
    before = model(input_ids=x).logits
    report = method.merge(start_dir)
    after = model(input_ids=x).logits
    assert torch.allclose(before, after, atol=1e-5)  # the merged model computes what θ + S did
    modules = dict(model.named_modules())
    for d in method.deltas:
        lin = modules[d.name]
        assert type(lin) is nn.Linear and not hasattr(lin, "seft_slots")
        assert torch.equal(lin.weight, expected[d.name])
        want = matrix_report(lin.weight.detach(), supports[d.name].view(d.shape),
                             starts[d.name] if with_start else None, d.budget, nm)
        assert report[d.name] == want
        assert ("reactivated" in want) == with_start and ("nm_valid" in want) == (nm is not None)
        if with_start and nm is None:
            assert (want["reactivated"], want["pruned_from_start"]) == (1, 1)
    if nm is not None:
        assert all(r["nm_valid"] for r in report.values())


def test_grown_slots_ramp_from_the_update_that_grew_them(pruned):
    """seft.slot_warmup reaches the optimizer, and an update's grown slots (and only they) start
    their since_grown count at 0, one more per step after."""
    from seft_scale.config import TrainConfig
    from seft_scale.seft.delta import SETTLED
    model = copy.deepcopy(pruned["unstructured"])
    seft = SeftConfig(lora_rank=2, update_interval=2, window=1, drop_rate=0.5, slot_warmup=4)
    method, wrapped = seft_method(LocalBackend(CPU), model, seft, train=TrainConfig(steps=6))
    assert method.opt.slot_warmup == 4
    method.init_state()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {}
    for step in (1, 2, 3):
        method.before_step(step)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        if step == 2:
            before = {d.name: d.pos.clone() for d in method.deltas}
            assert all(d.since_grown.eq(SETTLED).all() for d in method.deltas)  # initial slots only
        rec = method.after_backward(step, 1e-3)
        if step == 2:
            assert rec["grown"] > 0
            for d in method.deltas:
                new = ~torch.isin(d.pos, before[d.name])
                assert d.since_grown[new].eq(0).all() and d.since_grown[~new].eq(SETTLED).all()
    for d in method.deltas:  # step 3 moved nothing: the grown slots have taken one step
        new = ~torch.isin(d.pos, before[d.name])
        assert d.since_grown[new].eq(1).all() and d.since_grown[~new].eq(SETTLED).all()
