import os
import platform
import time

import pytest
import torch

from tests.gpu.support import has_module, load_txt_rows, write_facts

# cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes: set before
# the first cuBLAS call, so here, at collection); the resume test turns deterministic algorithms on
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(scope="session")
def gpu_facts():
    """What the GPU tests saw (versions, device, attention backend, ...), written at the end of
    the session to $SEFT_GPU_FACTS when set (launch/gpu_check.sh sets it)."""
    import transformers
    facts = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
             "packages": {m: has_module(m) for m in ("flash_attn", "peft", "datasets", "deepspeed")}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                     gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                     cudnn=torch.backends.cudnn.version())
    yield facts
    write_facts(facts)


@pytest.fixture
def txt_data(monkeypatch, gpu_facts):
    """.txt training data without `datasets` where it is not installed (the GPU machine's image has
    none): the data layer's local reader is replaced by TextRows, which gives the same rows."""
    if has_module("datasets"):
        gpu_facts["data_rows"] = "datasets"
        return
    from seft_scale.data.sources import Source
    monkeypatch.setattr(Source, "_load_local", load_txt_rows)
    gpu_facts["data_rows"] = "tests/gpu/support.TextRows (no datasets package)"
