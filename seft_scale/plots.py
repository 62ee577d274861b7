"""PNG figures of a run folder: the loss curve and where pruned positions came back."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path


def write_plots(run: Path) -> list[Path]:
    """loss.png from metrics.jsonl and reactivation.png from report.json (per decoder layer and
    matrix type); returns the files written (none when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    if metrics:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], lw=1.2)
        for m in metrics:
            if m.get("grown"):
                ax.axvline(m["step"], color="grey", lw=0.5, alpha=0.5)
        ax.set(xlabel="step", ylabel="training loss", title="loss (grey: topology updates)")
        fig.tight_layout()
        fig.savefig(run / "loss.png", dpi=120)
        plt.close(fig)
        written.append(run / "loss.png")
    report = json.loads((run / "report.json").read_text())["matrices"]
    if any("reactivated" in m for m in report.values()):
        per = defaultdict(lambda: defaultdict(int))
        for name, m in report.items():
            layer = re.search(r"\.(\d+)\.", name)
            per[name.rsplit(".", 1)[-1]][int(layer.group(1)) if layer else -1] += m.get("reactivated", 0)
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for kind, counts in sorted(per.items()):
            layers = sorted(counts)
            ax.plot(layers, [counts[i] for i in layers], marker="o", ms=3, lw=1, label=kind)
        ax.set(xlabel="decoder layer", ylabel="reactivated positions",
               title="pruned positions nonzero after repair")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(run / "reactivation.png", dpi=120)
        plt.close(fig)
        written.append(run / "reactivation.png")
    return written
