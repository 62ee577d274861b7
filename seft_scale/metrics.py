"""Per-step metrics to metrics.jsonl, the console, and TensorBoard when it is installed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, output_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step and self.path.exists():
            # keep the history up to the checkpoint, so the file reads like an uninterrupted run
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None
        self._fh = self.path.open("a")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


def format_record(r: dict, keys: Optional[list[str]] = None) -> str:
    keys = keys or ["step", "loss", "lr", "tokens_per_s", "step_time_s", "density", "dropped",
                    "grown", "reactivated", "adapt_pruned"]
    parts = []
    for k in keys:
        if k in r:
            v = r[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)
