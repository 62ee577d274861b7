"""No repair: the pruned model as it is (the loop runs no step); the comparison's floor."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from seft_scale.baselines.common import PaperDefaults, TorchOptimMethod


class NoRepair(TorchOptimMethod):
    name = "none"
    paper = PaperDefaults("the pruned model, no repair", lr=0.0)

    def build(self):
        return []

    def merge(self, start_dir: Optional[Path]) -> dict:
        return self.report(self.model, start_dir)
