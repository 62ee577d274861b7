"""Invariant: slot AdamW equals torch AdamW on a fixed slot set; seeded slots start with m̂ equal
to the window's mean gradient and v̂ to its mean squared gradient."""
import torch

from seft_scale.seft.delta import SETTLED, SparseDelta
from seft_scale.seft.optim import SlotAdamW, clip_slot_grads


def make_delta(k=50, seed=0):
    d = SparseDelta("m", (10, 20), 0, torch.zeros(200), budget=200, capacity=k)
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(200, generator=g)[:k]
    z = torch.zeros(k)
    d.add_slots(pos, z, z.clone(), torch.zeros(k, dtype=torch.int32))
    return d


def test_equals_torch_adamw_on_fixed_slots():
    d = make_delta()
    ref = torch.nn.Parameter(d.values.detach().clone())
    torch_opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = SlotAdamW(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(5)
    for step in range(25):
        grad = torch.randn(len(d.pos), generator=g) * (step + 1)
        ref.grad = grad.clone()
        d.values.grad = grad.clone()
        torch_opt.step()
        ours.step([d])
        torch.testing.assert_close(d.values.detach(), ref.detach(), rtol=1e-6, atol=1e-9)
    assert int(d.age[0]) == 25


def test_bias_corrections_from_tables_equal_the_per_slot_formula():
    """The looked-up corrections are the fp64 formula's bits at every age, beyond the tables'
    length too (clamped ages), and betas within ~1e-6 of 1 fall back to the formula."""
    for betas in [(0.9, 0.999), (0.0, 0.95), (0.5, 0.9999)]:
        opt = SlotAdamW(1e-3, betas)
        age = torch.arange(0, 200_000, 7, dtype=torch.int32)
        c1, c2 = opt._corrections(age)
        a = age.to(torch.float64)
        assert torch.equal(c1, (1 - betas[0] ** a).to(torch.float32))
        assert torch.equal(c2, (1 - betas[1] ** a).sqrt().to(torch.float32))
    assert SlotAdamW(1e-3, (0.9, 1 - 1e-7))._tables[1] is None
    c1, c2 = SlotAdamW(1e-3, (0.9, 1 - 1e-7))._corrections(torch.tensor([1, 10**6], dtype=torch.int32))
    assert torch.equal(c2, (1 - (1 - 1e-7) ** torch.tensor([1.0, 1e6], dtype=torch.float64)).sqrt().float())


def test_seeded_slot_first_step_follows_the_window():
    ours = SlotAdamW(lr=1e-2)
    mean, mean_sq = torch.tensor([0.5, -2.0, 1e-3]), torch.tensor([1.0, 4.0, 1e-6])
    m, v, age = ours.seed(mean, mean_sq, steps=5)
    b1, b2 = ours.betas
    torch.testing.assert_close(m / (1 - b1 ** 5), mean)
    torch.testing.assert_close(v / (1 - b2 ** 5), mean_sq)
    assert age.tolist() == [5, 5, 5]
    # the first step of a slot whose gradient flipped sign in the window (mean 0.5 of ±1) is
    # lr·0.5, not ±lr as a squared-mean seed would give
    d = make_delta(3)
    d.exp_avg, d.exp_avg_sq, d.age = m, v, age
    d.values.grad = torch.tensor([0.5, -2.0, 1e-3])
    before = d.values.detach().clone()
    ours.step([d])
    assert abs(float(d.values.detach()[0] - before[0])) < 0.6e-2
    m0, v0, a0 = ours.seed(mean, mean_sq, steps=0)
    assert not m0.any() and not v0.any() and not a0.any()


def test_grown_slots_ramp_their_lr_and_the_initial_slots_do_not():
    """slot_warmup W: a slot grown from a window moves min(1, t/W) as far as without the ramp at
    its t-th step (same moments: the ramp scales steps, not gradients); fresh slots not at all."""
    W, T = 4, 7
    ramped, plain = SlotAdamW(1e-2, slot_warmup=W), SlotAdamW(1e-2)
    pair = []
    for opt in (ramped, plain):
        d = make_delta(6)  # six initial slots
        grown = torch.tensor([p for p in range(200) if p not in set(d.pos.tolist())][:4])
        d.add_slots(grown, *opt.seed(torch.full((4,), 0.3), torch.full((4,), 0.2), steps=2))
        pair.append(d)
    is_grown = torch.isin(pair[0].pos, grown)
    assert pair[0].since_grown[is_grown].eq(0).all() and pair[0].since_grown[~is_grown].eq(SETTLED).all()
    g = torch.Generator().manual_seed(1)
    for t in range(1, T + 1):
        grad = torch.randn(10, generator=g)
        moved = []
        for opt, d in zip((ramped, plain), pair):
            before = d.values.detach().clone()
            d.values.grad = grad.clone()
            opt.step([d])
            moved.append(d.values.detach() - before)
        torch.testing.assert_close(moved[0][~is_grown], moved[1][~is_grown], rtol=0, atol=0)
        torch.testing.assert_close(moved[0][is_grown], moved[1][is_grown] * min(1.0, t / W))
    assert pair[0].since_grown[is_grown].eq(T).all() and pair[0].since_grown[~is_grown].eq(SETTLED).all()


def test_clip_global_norm():
    d1, d2 = make_delta(4), make_delta(3, seed=1)
    d1.values.grad = torch.tensor([3.0, 0, 0, 0])
    d2.values.grad = torch.tensor([0, 4.0, 0])
    norm, scale = clip_slot_grads([d1, d2], max_norm=1.0)
    assert abs(norm - 5.0) < 1e-9 and abs(scale - 1 / (5.0 + 1e-6)) < 1e-12
    total = torch.cat([d1.values.grad, d2.values.grad]).norm()
    assert abs(float(total) - 1.0) < 1e-5
