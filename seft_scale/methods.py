"""The repair methods, chosen by `method:` in the run config; every one ends with exactly the
pruned model's nonzero budget in every target matrix, so results compare at equal sparsity.

| method     | trains                                   | budget kept by                                 |
|------------|------------------------------------------|------------------------------------------------|
| seft       | K slots δ per matrix; topology evolves   | drop / grow / adapt (seft/topology.py)         |
| static     | every nonzero of the targets             | mask re-applied to weights, grads, Adam moments |
| lora_star  | LoRA (PEFT) on the targets               | merge, then re-prune with the run's pruner      |
| sqft       | LoRA whose update is masked, (B·A)⊙M     | the mask: the merged update is zero outside M  |
| spp        | W_α (r_g×d_in), W_β (d_out): W⊙(1+ΔW)    | the ⊙W factor: zeros of W stay zeros           |
| none       | nothing: the pruned model as it is       | —                                              |

SEFT runs on every backend; the baselines on one process, with fp32 trainable state over a
16-bit model. LoRA-based methods train r·(d_in + d_out) values per matrix, SEFT's K for
seft.lora_rank = r; spp r_g·d_in + d_out with r_g matched to that as closely as d_out's divisors
allow (`trainable_count` gives each method's real count).
"""
from __future__ import annotations

from seft_scale.baselines.common import lora_rank
from seft_scale.baselines.lora_star import LoraStarMethod
from seft_scale.baselines.none import NoRepair
from seft_scale.baselines.spp import SppMethod, spp_groups
from seft_scale.baselines.sqft import SqftMethod
from seft_scale.baselines.static import StaticMethod
from seft_scale.config import RunConfig
from seft_scale.seft.budget import slot_capacity
from seft_scale.seft.method import SeftMethod

METHODS = {"seft": SeftMethod, "static": StaticMethod, "lora_star": LoraStarMethod,
           "sqft": SqftMethod, "spp": SppMethod, "none": NoRepair}


def make_method(cfg: RunConfig, backend, model, targets, tokenizer):
    return METHODS[cfg.method](cfg, backend, model, targets, tokenizer)


def trainable_count(method: str, shapes_and_budgets: list[tuple[tuple[int, int], int]],
                    cfg: RunConfig) -> int:
    """Trainable values of `method` over matrices given as ((d_out, d_in), budget B)."""
    if method == "seft":
        return sum(slot_capacity(s, cfg.seft) for s, _ in shapes_and_budgets)
    if method in ("lora_star", "sqft"):
        r = lora_rank(cfg)
        return sum(r * (s[0] + s[1]) for s, _ in shapes_and_budgets)
    if method == "spp":
        r, fixed = lora_rank(cfg), cfg.baseline.spp_groups
        return sum(spp_groups(s[0], s[1], r, fixed) * s[1] + s[0] for s, _ in shapes_and_budgets)
    if method == "static":
        return sum(b for _, b in shapes_and_budgets)
    return 0
