"""launch/gpu_check.sh in its CPU mode (tiny shapes, fp32, local and one-rank gloo FSDP): every
step runs, the GPU tests are collected and skip with their reason, and the JSON and markdown it
writes hold the bench figures and the plan against the measured memory; the report marks failed,
timed-out and skipped steps (launch/bench/gpu_report.py on planted parts)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "launch" / "bench"))
import gpu_report  # noqa: E402


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("SEFT_GPU_FACTS", None)
    res = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh"), "--cpu"], env=env, cwd="/",
                         capture_output=True, text=True, timeout=600)
    return res, out


def test_cpu_mode_runs_every_step_and_writes_the_report(cpu_check):
    res, out = cpu_check
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["mode"] == "cpu"
    status = {s["step"]: s["status"] for s in rep["steps"]}
    assert status == {"tests": "ok", "bench": "ok", "build": "ok", "plan-local": "ok", "plan-fsdp": "ok",
                      "plan-zero3": "skipped"}
    t = rep["tests"]
    assert t["passed"] == t["failed"] == 0 and t["skipped"] >= 16
    assert any("CUDA is not available" in r for r in t["skip_reasons"])

    bench = rep["bench"]
    assert bench["run"]["shape"] == "tiny" and bench["run"]["dtype"] == "float32"
    assert set(bench["methods"]) == {"lora", "static", "seft:sddmm", "seft:dense"}
    s = bench["methods"]["seft:sddmm"]
    assert s["weight_grad_matmuls"] == 0 and s["plain"] > 0 and s["peak_window"] > s["peak_plain"] > 0
    assert bench["kernel_cost_ratio"] and all(r["ratio"] > 0 for r in bench["kernel_cost_ratio"].values())

    for backend, comm in (("local", None), ("fsdp", "gloo")):
        p = rep["plan"][backend]
        assert (p["backend"], p["world"], p["comm"]) == (backend, 1, comm)
        assert (p["dtype"], p["device"]) == ("float32", "cpu")
        assert (p["batch"], p["seq"], p["lora_rank"]) == (2, 64, 8)
        # resident state is exact tensor accounting on both sides; the phases are figures (their
        # 10 % agreement is tests/distributed/test_plan_measured.py's), so here a unit check only
        assert p["ratio"]["resident"] == pytest.approx(1, abs=0.1)
        assert all(0.5 < p["ratio"][k] < 2 for k in ("step", "window", "update")), p["ratio"]
    assert "skipped" in rep["plan"]["zero3"]["missing"]

    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check") and "(cpu mode)" in md
    for heading in ("## Steps", "## GPU tests", "## Step time and peak memory", "## Planner vs measured"):
        assert heading in md
    assert "| plan-zero3 | skipped |" in md and "| seft:sddmm |" in md
    assert "| fsdp | gloo | float32/float32 | step |" in md
    assert (out / "gpu_check.log").read_text().count("== ") >= 7
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def test_report_marks_failed_timed_out_and_missing_parts(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "steps.tsv").write_text("tests\t1\t30\t\nbench\t124\t90\tover its 90s limit\n"
                                     "plan-local\t0\t5\t\n"
                                     "plan-zero3\tskipped\t0\tdeepspeed cannot be imported\n")
    (parts / "junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.gpu.test_gpu" name="test_a"/>'
        '<testcase classname="tests.gpu.test_gpu" name="test_b"><failure message="boom&#10;more"/></testcase>'
        '<testcase classname="tests.gpu.test_gpu" name="test_c"><skipped message="no peft"/></testcase>'
        '</testsuite></testsuites>')
    gpu_report.main(["--parts", str(parts), "--out", str(tmp_path / "out"), "--mode", "cuda"])
    rep = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"] for s in rep["steps"]] == ["failed (exit 1)", "timed out", "ok", "skipped"]
    assert rep["tests"]["passed"] == rep["tests"]["failed"] == rep["tests"]["skipped"] == 1
    assert rep["tests"]["failures"][0]["test"] == "tests.gpu.test_gpu::test_b"
    assert rep["plan"]["local"] == {"missing": "no plan-local.json (step ok)"}
    assert rep["plan"]["fsdp"] == {"missing": "not run"}
    assert rep["plan"]["zero3"]["missing"] == "skipped: deepspeed cannot be imported"
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| bench | timed out | 90 | over its 90s limit |" in md
    assert "- FAILED tests.gpu.test_gpu::test_b: boom" in md
    assert "no figures (the bench step failed or was skipped" in md
