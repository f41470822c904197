#!/usr/bin/env bash
# The GPU checks of issue 9 in one run, from a fresh checkout on a CUDA machine without internet, in < 8 minutes.
#
#   bash tests/gpu/fetch_wheels.sh          # first, where pip reaches PyPI: the wheels the GPU image lacks
#   OUT=/tmp/gpu-out bash tests/gpu/run.sh  # on the GPU machine, from the repository root
#
# With the device tool: run(command="bash tests/gpu/run.sh", carry=["tests/gpu/wheels"], timeout_s=540).
# Steps (each bounded by its own timeout, 575 s together, normally far less; a failing step is recorded and the
# next one still runs):
#   1. install the carried wheels into $SITE (PYTHONPATH, the image's own packages untouched) and the project
#      itself with `pip install --no-deps --no-build-isolation -e .` (nothing fetched, nothing compiled);
#   2. pytest -m gpu tests/gpu (junit XML + log);
#   3. afd bench engine --device cuda --json (bf16, batch 1 and 32, against transformers on the same GPU, roofline
#      from the GPU's measured copy bandwidth) on the mid-size Qwen3-MoE (benchmarks/midsize_checkpoints.py) and on
#      --model-size large (hidden 2048, 24 layers, 64 experts top-8, about 5 GB);
#   4. afd bench transport --transport nccl --json (two processes, one GPU).
# Everything lands in $OUT (8 files, which is what the device tool brings back): run.log, env.txt,
# pytest.log, pytest.xml, bench_engine.json, bench_engine_large.json, bench_transport.json, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=${AFD_GPU_SITE:-/tmp/afd-gpu-site}
WHEELS=$REPO/tests/gpu/wheels
MODELS=${AFD_GPU_MODELS:-/tmp/afd-gpu-models}
exec > >(tee -a "$OUT/run.log") 2>&1
exec 3>&1  # step() reports here, so a step's own output can go to a file of its own (JSON stays JSON)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the CPU FFN pool of the mixed-pool tests runs without the native CPU kernels: compiling them costs a minute
# of the budget and they are what the CPU suite measures, not this run
export AFD_NATIVE_KERNELS=${AFD_NATIVE_KERNELS:-0}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/afd-gpu-cache}
started=$(date +%s)
: > "$OUT/summary.txt"

step() {  # step NAME TIMEOUT_S COMMAND...: run it bounded, log rc and seconds in summary.txt
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s, at +$((t0 - started))s)" >&3
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - t0))s" | tee -a "$OUT/summary.txt" >&3
  return $rc
}

# ---- 1. install ------------------------------------------------------------------------------------------------
install() {
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  else
    echo "no wheels in $WHEELS (run tests/gpu/fetch_wheels.sh where pip reaches PyPI, and carry the folder)"
  fi
  # the console script `afd`; if the offline editable install fails, PYTHONPATH below still serves the sources
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO" \
    || echo "editable install failed; using PYTHONPATH=$REPO and python -m orchestration.cli"
}
mkdir -p "$SITE"
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}
if [[ ${AFD_GPU_SKIP_INSTALL:-0} == 1 ]]; then  # a rerun on the same machine, or a dry run of the script
  echo "install skipped (AFD_GPU_SKIP_INSTALL=1)"
else
  step install 45 install
fi
AFD=("$PY" -m orchestration.cli)

{
  echo "date: $(date -u +%FT%TZ)  commit: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" - <<'PY'
import importlib.metadata as m, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for name in ("transformers", "fastapi", "pydantic", "uvicorn", "grpcio", "protobuf", "openai", "nvidia-nccl-cu13",
             "nvidia-nccl-cu12", "flashinfer-python"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} -")
from afd.devices import describe_present
print("afd.devices:", describe_present())
from afd.transport.nccl.library import unavailable_reason
print("nccl:", unavailable_reason() or "usable")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- 2. the GPU tests ------------------------------------------------------------------------------------------
step pytest 240 "$PY" -m pytest -m gpu tests/gpu -v -rs -p no:cacheprovider --timeout 120 \
  --junitxml "$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
tail -n 40 "$OUT/pytest.log"

if [[ ${AFD_GPU_BENCH:-1} == 0 ]]; then  # AFD_GPU_BENCH=0: the tests only (a rerun when device time is short)
  echo "benchmarks skipped (AFD_GPU_BENCH=0)" | tee -a "$OUT/summary.txt"
  cat "$OUT/summary.txt"
  ! grep -q 'rc=[1-9]' "$OUT/summary.txt"
  exit
fi

# ---- 3. engine vs transformers on the GPU ------------------------------------------------------------------------
midsize() { "$PY" -m benchmarks.midsize_checkpoints --family qwen3_moe "$MODELS/qwen3_moe-mid"; }
if step midsize_checkpoint 50 midsize; then
  step bench_engine 100 "${AFD[@]}" bench engine --device cuda --json --checkpoint "$MODELS/qwen3_moe-mid" \
    --batch 1 --batch 32 --repeats 2 > "$OUT/bench_engine.json"
  cat "$OUT/bench_engine.json"
fi
# the issue's larger model (hidden 2048, 24 layers, 64 experts top-8, about 5 GB of bf16), written by bench engine
step bench_engine_large 110 "${AFD[@]}" bench engine --device cuda --json --model-size large \
  --batch 1 --batch 32 --repeats 2 > "$OUT/bench_engine_large.json"
cat "$OUT/bench_engine_large.json"

# ---- 4. NCCL between two processes on one GPU --------------------------------------------------------------------
if "${AFD[@]}" bench transport --help 2>/dev/null | grep -q nccl; then
  step bench_transport 30 "${AFD[@]}" bench transport --transport nccl --json --max-bytes 16777216 \
    --latency-iters 100 > "$OUT/bench_transport.json"
  cat "$OUT/bench_transport.json"
else
  echo "bench_transport skipped: afd bench transport has no nccl" | tee -a "$OUT/summary.txt"
fi

echo "total $(($(date +%s) - started))s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
# the run fails when any step failed (rc != 0), so the caller sees it without reading the summary
! grep -q 'rc=[1-9]' "$OUT/summary.txt"
