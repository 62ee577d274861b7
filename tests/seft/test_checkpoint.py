"""SEFT state in checkpoints (seft_scale/seft/checkpoint.py): written by W shards, loaded by W'
shards over other, uneven flat ranges, it is the same state bit for bit. Shards are threads
(tests/helpers.py ThreadGroup), each writing its own rank file as a rank does."""
import pytest
import torch

from seft_scale.checkpoint import latest_checkpoint, rank_file, save_checkpoint
from seft_scale.seft.checkpoint import delta_tensors, load_deltas
from seft_scale.seft.delta import SETTLED, SparseDelta
from seft_scale.seft.optim import SlotAdamW
from seft_scale.seft.topology import check_budget, init_slots, topology_update
from seft_scale.seft.window import DenseWindow, open_window
from tests.helpers import ThreadGroup, shard_bounds

SHAPES = {"model.layers.0.q": (12, 16), "model.layers.0.k": (7, 12), "model.layers.1.q": (16, 8)}
CAPACITY = 9
OPT = SlotAdamW(1e-2)
FIELDS = ("base", "support", "edited", "zeros", "pos", "values", "exp_avg", "exp_avg_sq", "age", "since_grown")
WINDOW = {"dense": ("sum", "sumsq"),
          "candidates": ("cand_pos", "cand_sum", "cand_sumsq", "cand_sets")}


def starting_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (r, c) in SHAPES.items():
        theta = torch.randn(r * c, generator=g)
        theta[torch.rand(r * c, generator=g) < 0.5] = 0
        out[name] = theta
    return out


def bounds(n: int, world: int, split: str, rows: int) -> list[tuple[int, int]]:
    """zero: ZeRO-3's ceil(n / world) partitions; rows: FSDP2's torch.chunk of whole rows;
    skewed: very uneven, with an empty shard whenever world > 2."""
    if split == "zero":
        return [shard_bounds(n, world, r) for r in range(world)]
    if split == "rows":
        cols, per = n // rows, -(-rows // world)
        return [(min(r * per, rows) * cols, min((r + 1) * per, rows) * cols) for r in range(world)]
    cuts = [0] + [n // 8] * min(world - 1, 2)  # a small first shard, then an empty one
    rest = world + 1 - len(cuts)  # shards left, over [n // 8, n)
    cuts += [cuts[-1] + (n - cuts[-1]) * j // rest for j in range(1, rest + 1)]
    return list(zip(cuts, cuts[1:]))


def shards(theta: dict, rank: int, world: int, split: str) -> list[SparseDelta]:
    out = []
    for name, (r, c) in SHAPES.items():
        lo, hi = bounds(r * c, world, split, r)[rank]
        out.append(SparseDelta(name, (r, c), lo, theta[name].clone()[lo:hi],
                               budget=int((theta[name] != 0).sum()), capacity=CAPACITY))
    return out


def trained_state(out, world: int, split: str, kind: str = "candidates"):
    """Slots placed, trained (a deterministic stand-in), one topology update that edits θ, and a
    selection window in progress; saved as a checkpoint by `world` thread ranks."""
    theta = starting_weights()

    def rank(r, allreduce):
        deltas = shards(theta, r, world, split)
        init_slots(deltas, seed=3, seed_fn=OPT.seed, allreduce=allreduce)
        for d in deltas:
            gpos = torch.arange(d.length) + d.offset
            d.values = (torch.sin(d.pos.double() * 1.7).float()).requires_grad_()
            d.exp_avg, d.exp_avg_sq = torch.cos(d.pos.float()), torch.sin(d.pos.float()) ** 2
            d.window = DenseWindow(d)
            d.window.add(torch.cos(gpos.double() * 0.3).float())
            d.window.end_step(1.0)
        topology_update(deltas, 0.5, OPT.seed, allreduce=allreduce)
        check_budget(deltas, allreduce)
        for d in deltas:  # the next window has begun: one step of it is in the scores
            d.since_grown = torch.where(d.since_grown == SETTLED, SETTLED, d.pos % 5).to(torch.int16)
            d.window = open_window(d, kind, 4, False, True, allreduce)
            d.window.add(torch.sin(torch.arange(d.length, dtype=torch.float32) + d.offset))
            d.window.end_step(0.5)
        save_checkpoint(out, 12, delta_tensors(deltas), {}, rank=r, world=world,
                        barrier=lambda: allreduce(torch.zeros(1)))
        return deltas

    return theta, ThreadGroup(world).run(rank)


def shard_state(d: SparseDelta) -> dict:
    edited = torch.zeros(d.length, dtype=torch.bool)
    edited[d.edited.positions()] = True
    out = {"support": d.support(), "edited": edited}
    out.update({f: getattr(d, f).detach() for f in FIELDS if f not in out})
    w = d.window.state_dict() if d.window is not None else {}
    out.update({f"window.{k}": v for k, v in w.items() if k != "steps"})
    return out


def full_state(per_rank: list[list[SparseDelta]]) -> dict:
    """Each matrix's state over all shards, in rank (= flat position) order."""
    state = {}
    for i, name in enumerate(SHAPES):
        parts = [shard_state(deltas[i]) for deltas in per_rank]
        state[name] = {f: torch.cat([p[f] for p in parts]) for f in parts[0]}
    return state


CASES = [(1, "zero", 3, "zero"), (3, "zero", 1, "zero"), (2, "zero", 3, "rows"), (3, "rows", 2, "zero"),
         (3, "zero", 3, "skewed"), (4, "skewed", 3, "rows"), (2, "rows", 4, "skewed")]


@pytest.mark.parametrize("kind", ["candidates", "dense"])
@pytest.mark.parametrize("w_save, split_save, w_load, split_load", CASES)
def test_reshard_to_any_world_size(tmp_path, w_save, split_save, w_load, split_load, kind):
    theta, saved = trained_state(tmp_path, w_save, split_save, kind)
    ref = full_state(saved)
    assert any(bool(s["edited"].any()) for s in ref.values())  # θ was edited: edits are restored
    ckpt = latest_checkpoint(tmp_path)
    loaded = []
    for r in range(w_load):
        deltas = shards(theta, r, w_load, split_load)  # fresh shards of the starting θ
        windows = load_deltas(ckpt, deltas)
        for d in deltas:  # the window is reopened as the method does, then given its saved state
            d.window = open_window(d, kind, 4, False, True, None)
            d.window.load_state_dict(windows[d.name])
            assert d.window.steps == 1
        loaded.append(deltas)
    got = full_state(loaded)
    for name in SHAPES:
        assert set(ref[name]) == set(got[name]) >= set(FIELDS) | {f"window.{k}" for k in WINDOW[kind][:2]}
        for f, a in ref[name].items():
            b = got[name][f]
            assert a.dtype == b.dtype and torch.equal(a, b), (name, f)


def test_a_checkpoint_older_than_since_grown_loads_its_slots_settled(tmp_path):
    theta, saved = trained_state(tmp_path / "new", 2, "zero")

    def write_without_the_field(r, allreduce):  # as a checkpoint written before it was
        tensors = {k: v for k, v in delta_tensors(saved[r]).items() if not k.endswith("/since_grown")}
        save_checkpoint(tmp_path / "old", 12, tensors, {}, rank=r, world=2,
                        barrier=lambda: allreduce(torch.zeros(1)))

    ThreadGroup(2).run(write_without_the_field)
    loaded = shards(theta, 0, 1, "zero")
    load_deltas(latest_checkpoint(tmp_path / "old"), loaded)
    for d, name in zip(loaded, SHAPES):
        assert torch.equal(d.pos, torch.cat([ds[list(SHAPES).index(name)].pos for ds in saved]))
        assert d.since_grown.dtype == torch.int16 and d.since_grown.eq(SETTLED).all()


def test_the_splits_are_uneven():
    assert bounds(84, 3, "zero", 7) == [(0, 28), (28, 56), (56, 84)]
    assert bounds(84, 3, "rows", 7) == [(0, 36), (36, 72), (72, 84)]
    assert bounds(84, 3, "skewed", 7) == [(0, 10), (10, 10), (10, 84)]
    assert bounds(84, 4, "skewed", 7) == [(0, 10), (10, 10), (10, 47), (47, 84)]
    assert bounds(84, 2, "skewed", 7) == [(0, 10), (10, 84)] and bounds(84, 1, "skewed", 7) == [(0, 84)]


def test_missing_or_partial_state_is_named(tmp_path):
    theta, _ = trained_state(tmp_path, 2, "zero")
    ckpt = latest_checkpoint(tmp_path)
    stranger = [SparseDelta("model.layers.9.q", (2, 2), 0, torch.ones(4), budget=4, capacity=1)]
    with pytest.raises(KeyError, match="no state for model.layers.9.q"):
        load_deltas(ckpt, stranger)
    (ckpt / rank_file(1)).unlink()  # a rank's file lost: its range is not covered
    with pytest.raises(ValueError, match=r"the saved shards of model\.layers\.0\.q cover 96 of this "
                                         r"rank's 192 positions"):
        load_deltas(ckpt, shards(theta, 0, 1, "zero"))
    (ckpt / rank_file(0)).unlink()
    with pytest.raises(FileNotFoundError, match="holds no slots-rank"):
        load_deltas(ckpt, shards(theta, 0, 1, "zero"))
