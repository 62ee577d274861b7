"""The method registry (seft_scale/methods.py): every `method:` choice has a class, and
`trainable_count` — what compare matches budgets with — is what each method really trains."""
import copy
import typing

import pytest
import torch

from seft_scale.backends.local import LocalBackend
from seft_scale.config import RunConfig, SeftConfig, load_config
from seft_scale.errors import ConfigError
from seft_scale.baselines.spp import spp_groups
from seft_scale.methods import METHODS, make_method, trainable_count
from seft_scale.model import find_targets
from tests.helpers import pruned_tiny_llama


def test_registry_matches_the_config_choices():
    choices = typing.get_args(typing.get_type_hints(RunConfig)["method"])
    assert set(METHODS) == set(choices)
    assert all(cls.name == key for key, cls in METHODS.items())


def test_trainable_counts_match_lora_rank(tiny_yaml):
    cfg = load_config(tiny_yaml, ["seft.lora_rank=3"])
    mats = [((64, 64), 2048), ((32, 64), 1024), ((160, 64), 5120), ((64, 160), 5120)]
    r = 3 * sum(a + b for (a, b), _ in mats)
    assert trainable_count("seft", mats, cfg) == trainable_count("lora_star", mats, cfg) == r
    assert trainable_count("sqft", mats, cfg) == r and trainable_count("static", mats, cfg) == 13312
    assert trainable_count("none", mats, cfg) == 0
    # spp: r_g·d_in + d_out with r_g the divisor of d_out closest to the LoRA budget
    assert [spp_groups(o, i, 3) for (o, i), _ in mats] == [4, 4, 8, 4]
    assert trainable_count("spp", mats, cfg) == 4 * 64 + 64 + 4 * 64 + 32 + 8 * 64 + 160 + 4 * 160 + 64
    assert spp_groups(11008, 4096, 8, fixed=16) == 16  # SPP's code: 16 row groups
    assert spp_groups(4096, 4096, 8) == 16  # 2r - 1 = 15 does not divide 4096
    fixed = load_config(tiny_yaml, ["seft.lora_rank=3", "baseline.spp_groups=16"])
    assert trainable_count("spp", mats[:1], fixed) == 16 * 64 + 64


def test_trainable_count_by_density_and_capped():
    cfg = RunConfig(seft=SeftConfig(lora_rank=None, density=0.1))
    assert trainable_count("seft", [((10, 20), 100), ((3, 3), 9)], cfg) == 20 + 1  # at least 1
    cfg = RunConfig(seft=SeftConfig(lora_rank=100))
    assert trainable_count("seft", [((4, 4), 16)], cfg) == 16  # never more than the matrix


@pytest.fixture(scope="module")
def pruned():
    return pruned_tiny_llama()


@pytest.mark.parametrize("method", list(METHODS))
def test_make_method_trains_what_trainable_count_says(pruned, method):
    if method == "lora_star":
        pytest.importorskip("peft")
    cfg = RunConfig(method=method, seft=SeftConfig(lora_rank=2))
    model = copy.deepcopy(pruned)
    targets = find_targets(model, cfg.seft.targets)
    shapes = [(tuple(lin.weight.shape), int((lin.weight != 0).sum())) for _, lin in targets]
    m = make_method(cfg, LocalBackend(torch.device("cpu")), model, targets, None)
    assert isinstance(m, METHODS[method])
    m.init_state()
    support, trainable = m.local_counts()
    assert support == sum(b for _, b in shapes)
    assert trainable == trainable_count(method, shapes, cfg)


class Sharded(LocalBackend):
    sharded = True


@pytest.mark.parametrize("method", ["static", "sqft", "spp", "none"])
def test_baselines_refuse_sharded_backends(pruned, method):
    cfg = RunConfig(method=method, seft=SeftConfig(lora_rank=2))
    model = copy.deepcopy(pruned)
    with pytest.raises(ConfigError, match=f"^method: {method} runs on one process"):
        make_method(cfg, Sharded(torch.device("cpu")), model, find_targets(model, cfg.seft.targets), None)
