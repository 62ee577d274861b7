#!/usr/bin/env bash
# The GPU check: one command that, on one CUDA GPU (sized for an H200), runs in under 8 minutes
# (each step has a time limit; their sum is 480 s) and writes one JSON and one markdown table:
#
#   bash launch/gpu_check.sh            # CUDA when torch sees a GPU, else the CPU mode
#   bash launch/gpu_check.sh --cpu      # the CPU mode anywhere (what tests/launch/test_gpu_check.py runs)
#   OUT=DIR PYTHON=python3 bash launch/gpu_check.sh
#
# Steps (CUDA mode; the CPU mode runs the same steps at small shapes in fp32):
#   tests       pytest -m gpu tests/gpu: every method trains, keeps the budget, resumes bit-identical
#               and exports on the GPU in bf16; the SEFT kernels against a dense reference; which
#               attention (and sdpa backend) ran. CPU mode: they are collected and skip.
#   bench       launch/bench/bench_step.py --shape l7 (Llama-2-7B's layers, bf16): step time and
#               torch.cuda.max_memory_allocated of SEFT per kernel, PEFT LoRA and static, SEFT's
#               window and update steps, the kernel cost ratio. CPU mode: --shape tiny.
#   plan-*      launch/bench/gpu_plan.py: seft_scale/plan.py's per-GPU prediction against the
#               measured peak of the same run at world size 1: local; fsdp (one NCCL rank, an
#               in-process group; gloo in the CPU mode); zero3 (one rank) where deepspeed imports,
#               CUDA mode only (on CPU DeepSpeed JIT-builds its shm op at init; tests/distributed
#               covers ZeRO-3 on CPU).
#   report      launch/bench/gpu_report.py merges the parts: $OUT/gpu_check.json, $OUT/gpu_check.md.
# Everything printed also goes to $OUT/gpu_check.log. Exit status 0 only if no step failed.
#
# What the machine needs: python3 with torch, transformers, peft, pytest, safetensors, tokenizers,
# pyyaml (seft_scale is imported from this checkout: PYTHONPATH). `datasets`, a dependency of the
# package, is not needed: the GPU tests read their .txt data through tests/gpu/support.TextRows
# where it is missing. DeepSpeed is optional; a machine without it skips plan-zero3 with the reason.
# To bring it to a machine that reaches no registry (download the wheels elsewhere with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64`,
# there `pip install --no-index --no-deps --target DIR` and DIR on PYTHONPATH), these must travel,
# about 5 MB in all (sizes as downloaded 2026-12), far under a 64 MiB tree: deepspeed 0.19.8, the version
# tests/distributed runs (PyPI has no wheel of it, only a 2.0 MB sdist: build the pure-Python wheel
# with `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8`), pydantic 2.14.4 (0.5 MB),
# pydantic-core 2.50.5 cp312 manylinux2014 (2.3 MB), hjson, annotated-types, typing-inspection
# (0.1 MB together); its other needs (ninja, msgpack, psutil, py-cpuinfo, packaging, numpy, tqdm,
# einops) were on the H200 image this check was written for.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check-$(date +%Y%m%d-%H%M%S)}
MODE=auto
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash launch/gpu_check.sh [--cpu]   (OUT=DIR, PYTHON=interpreter)" >&2; exit 2 ;;
esac
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false
if [ "$MODE" = auto ]; then
  MODE=cpu
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && MODE=cuda
fi
mkdir -p "$OUT" || exit 2
PARTS=$(mktemp -d)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "gpu_check: $MODE mode, $(date), parts in $PARTS, report in $OUT"
[ "$MODE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv

FAILED=0
step() {  # NAME LIMIT_S COMMAND...: run it under a time limit, record exit status and seconds
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo; echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  [ "$rc" -eq 0 ] || FAILED=1
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="over its ${limit}s limit"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$note" >> "$PARTS/steps.tsv"
}
skip() {  # NAME REASON
  echo; echo "== $1: skipped: $2"
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$PARTS/steps.tsv"
}

if [ "$MODE" = cuda ]; then
  BENCH=(--shape l7 --layers 2 --batch 1 --seq 2048 --rank 32 --repeats 10)
  BUILD=(--shape l7 --layers 2)
  MEASURE=(--batch 2 --seq 2048 --rank 32)
  LIMITS=(230 90 40 30 40 40)   # tests bench build local fsdp zero3; + report 10 = 480 s
else
  BENCH=(--shape tiny --layers 1 --batch 1 --seq 64 --rank 4 --repeats 1 --device cpu --dtype float32)
  BUILD=(--shape tiny --layers 2 --max-seq 512 --device cpu --dtype float32)
  MEASURE=(--batch 2 --seq 64 --rank 8 --dtype float32 --device cpu)
  LIMITS=(230 90 40 30 40 40)
fi

step tests "${LIMITS[0]}" env SEFT_GPU_FACTS="$PARTS/facts.json" "$PY" -m pytest -q -m gpu tests/gpu \
  -p no:cacheprovider --junitxml="$PARTS/junit.xml"
step bench "${LIMITS[1]}" "$PY" launch/bench/bench_step.py "${BENCH[@]}" --json "$PARTS/bench.json"
MODEL=$PARTS/model
step build "${LIMITS[2]}" "$PY" launch/bench/gpu_plan.py build "${BUILD[@]}" --out "$MODEL"
if [ -f "$MODEL/config.json" ]; then
  step plan-local "${LIMITS[3]}" "$PY" launch/bench/gpu_plan.py measure --model "$MODEL" --backend local \
    "${MEASURE[@]}" --json "$PARTS/plan-local.json"
  step plan-fsdp "${LIMITS[4]}" "$PY" launch/bench/gpu_plan.py measure --model "$MODEL" --backend fsdp \
    "${MEASURE[@]}" --json "$PARTS/plan-fsdp.json"
  if [ "$MODE" != cuda ]; then
    skip plan-zero3 "CPU mode: ZeRO-3 is measured on CUDA only (tests/distributed covers it on CPU)"
  elif ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    skip plan-zero3 "deepspeed cannot be imported here (carry its wheels: see launch/gpu_check.sh's header)"
  else
    step plan-zero3 "${LIMITS[5]}" "$PY" launch/bench/gpu_plan.py measure --model "$MODEL" --backend zero3 \
      "${MEASURE[@]}" --json "$PARTS/plan-zero3.json"
  fi
else
  for b in local fsdp zero3; do skip "plan-$b" "no model folder: the build step failed"; done
fi
rm -rf "$MODEL"  # the weights (about 0.8 GB at l7) are no part of the report

echo; echo "== report"
if ! timeout 10 "$PY" launch/bench/gpu_report.py --parts "$PARTS" --out "$OUT" --mode "$MODE"; then
  FAILED=1
  mkdir -p "$OUT/parts" && cp "$PARTS"/*.* "$OUT/parts/" 2>/dev/null  # the raw parts, for a look by hand
fi
rm -rf "$PARTS"
if [ "$FAILED" = 0 ]; then echo "gpu_check: every step ok; wrote $OUT"
else echo "gpu_check: some step FAILED (see Steps in $OUT/gpu_check.md)"; fi
exit $FAILED
