#!/usr/bin/env python
"""launch/gpu_check.sh's report: the parts its steps wrote, merged into one JSON and one markdown
table (figures, not tests).

    python launch/bench/gpu_report.py --parts PARTS_DIR --out OUT_DIR --mode cuda

Parts (each may be missing: the step that writes it failed or was skipped, which steps.tsv says):
steps.tsv (step, exit status or "skipped", seconds, note), junit.xml and facts.json (the GPU tests),
bench.json (bench_step.py --json), plan-<backend>.json (gpu_plan.py measure --json).
Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; reads nothing else and imports no torch.
"""
from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

GIB, MIB = float(1 << 30), float(1 << 20)
BACKENDS = ("local", "fsdp", "zero3")


def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, seconds, note = (line.split("\t") + [""] * 4)[:4]
            ok = status == "0"
            steps.append({"step": name, "status": "ok" if ok else "skipped" if status == "skipped"
                          else "timed out" if status in ("124", "137") else f"failed (exit {status})",
                          "seconds": int(seconds or 0), "note": note})
    return steps


def read_junit(path: Path) -> dict | None:
    """Counts, failed test ids and skip reasons of a pytest --junitxml file."""
    if not path.is_file():
        return None
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:500]})
        elif skip is not None:
            out["skipped"] += 1
            reason = skip.get("message") or ""
            if reason not in out["skip_reasons"]:
                out["skip_reasons"].append(reason)
        else:
            out["passed"] += 1
    return out


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def collect(parts: Path, mode: str) -> dict:
    steps = read_steps(parts / "steps.tsv")
    plan = {}
    for b in BACKENDS:
        got = read_json(parts / f"plan-{b}.json")
        step = next((s for s in steps if s["step"] == f"plan-{b}"), None)
        if got is None:
            why = "not run" if step is None else f"skipped: {step['note']}" if step["status"] == "skipped" \
                else f"no plan-{b}.json (step {step['status']})"
            got = {"missing": why}
        plan[b] = got
    return {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": steps,
            "tests": read_junit(parts / "junit.xml"), "facts": read_json(parts / "facts.json"),
            "bench": read_json(parts / "bench.json"), "plan": plan}


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def markdown(rep: dict) -> str:
    facts, bench = rep["facts"] or {}, rep["bench"] or {}
    run = bench.get("run", {})
    where = facts.get("gpu") or run.get("gpu") or "no GPU (CPU mode)"
    versions = ", ".join(f"{k} {facts.get(k) or run.get(k)}"
                         for k in ("torch", "cuda", "transformers", "python") if facts.get(k) or run.get(k))
    out = [f"# GPU check, {rep['date']}: {where} ({rep['mode']} mode)", "", versions, ""]
    cols = ["step", "status", "seconds", "note"]
    out += ["## Steps", ""] + _table(cols, [[s[k] for k in cols] for s in rep["steps"]])
    t = rep["tests"]
    out += ["", "## GPU tests (tests/gpu, pytest -m gpu)", ""]
    if t is None:
        out.append("no junit report (the step failed before pytest wrote it: see the log)")
    else:
        out.append(f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                   + (f" ({'; '.join(t['skip_reasons'])})" if t["skip_reasons"] else ""))
        out += [f"- FAILED {f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}"
                for f in t["failures"]]
    att = facts.get("attention", {})
    if att:
        out += [""] + _table(["attention (model)", "implementation", "sdpa backends", "CUDA kernels"],
                             [[k, v.get("implementation"), ", ".join(v.get("backends", [])) or "-",
                               ", ".join(v.get("cuda_kernels", [])[:3]) or "-"] for k, v in att.items()])
    methods = facts.get("methods", {})
    if methods:
        out += [""] + _table(["method", "trained on", "exact budget", "resume", "nondeterministic ops"],
                             [[k, v.get("trained_on", "-"), v.get("exact_budget", "-"), v.get("resume", "-"),
                               "; ".join(v.get("nondeterministic_ops", [])) or "none"]
                              for k, v in methods.items()])
    if "data_rows" in facts:
        out += ["", f"training data rows read by: {facts['data_rows']}"]

    out += ["", "## Step time and peak memory (launch/bench/bench_step.py)", ""]
    res = bench.get("methods")
    if not res:
        out.append("no figures (the bench step failed or was skipped: see Steps)")
    else:
        out.append(f"{run.get('shape')} x {run.get('layers')} layers (hidden {run.get('hidden')}, "
                   f"intermediate {run.get('intermediate')}), batch {run.get('batch')}x{run.get('seq')}, "
                   f"rank {run.get('rank')}, {run.get('device')} {run.get('dtype')}, {run.get('repeats')} "
                   "repeats (median)")
        lora = res.get("lora", {})
        rows = []
        for name, r in res.items():
            peak = r.get("peak_plain")
            rows.append([name, f"{r['plain'] * 1e3:.2f}",
                         f"{r['plain'] / lora['plain']:.2f}" if lora else "-",
                         f"{peak / MIB:.1f}" if peak is not None else "-",
                         f"{peak / lora['peak_plain']:.2f}" if peak is not None and lora else "-",
                         f"{r['trainable']:,}" if r.get("trainable") else "-"])
        out += [""] + _table(["method", "plain step ms", "x LoRA", "peak MiB above model", "x LoRA",
                              "trainable"], rows)
        s = next((r for k, r in res.items() if k.startswith("seft:") and "first" in r), None)
        if s:
            out += [""] + _table(["SEFT phase", "ms", "x LoRA step"], [
                [k, f"{s[k] * 1e3:.2f}", f"{s[k] / lora['plain']:.2f}"]
                for k in ("plain", "first", "later", "update", "amortised")] + [
                ["window step peak MiB", f"{s['peak_window'] / MIB:.1f}", "-"],
                ["full weight-gradient matmuls in a plain step", s["weight_grad_matmuls"], "-"]])
        ratios = bench.get("kernel_cost_ratio", {})
        if ratios:
            out += [""] + _table(["matrix", "sddmm ms", "dense G ms", "gather_cost_ratio"],
                                 [[k, f"{v['sddmm_ms']:.3f}", f"{v['dense_ms']:.3f}", f"{v['ratio']:.1f}"]
                                  for k, v in ratios.items()])

    out += ["", "## Planner vs measured, per GPU, world size 1 (launch/bench/gpu_plan.py)", ""]
    rows, notes = [], []
    for b, p in rep["plan"].items():
        if "missing" in p:
            rows.append([b, "-", "-", "-", "-", "-", p["missing"]])
            continue
        for phase in ("resident", "step", "window", "update"):
            rows.append([b, p.get("comm") or "-", f"{p['dtype']}/{p['compute_dtype']}", phase,
                         f"{p['planned'][phase] / GIB:.3f}", f"{p['measured'][phase] / GIB:.3f}",
                         f"{p['ratio'][phase]:.2f}"])
        if p.get("seft_plan_dtype") and p["seft_plan_dtype"] != p["dtype"]:
            notes.append(f"- {b}: θ was stored as {p['dtype']}, while seft-plan plans "
                         f"{p['seft_plan_dtype']} for this config (model.dtype auto)")
        measured_by = p.get("measured_by")
    out += _table(["backend", "comm", "θ/compute", "phase", "planned GiB", "measured GiB",
                   "measured/planned"], rows)
    first = next((p for p in rep["plan"].values() if "missing" not in p), None)
    if first:
        shape = first["model"]
        out += ["", f"model {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}; "
                f"batch {first['batch']}x{first['seq']}, seft.lora_rank {first['lora_rank']}, window scores "
                f"{first['window_scores']}; measured: {measured_by}"]
    out += notes
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", required=True, help="the folder the check's steps wrote into")
    ap.add_argument("--out", required=True, help="where gpu_check.json and gpu_check.md go")
    ap.add_argument("--mode", choices=["cuda", "cpu"], required=True)
    args = ap.parse_args(argv)
    rep = collect(Path(args.parts), args.mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=1) + "\n")
    md = markdown(rep)
    (out / "gpu_check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
