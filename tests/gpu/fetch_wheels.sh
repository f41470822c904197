#!/usr/bin/env bash
# Download, on a machine with internet, the wheels that the GPU machine's image lacks, into tests/gpu/wheels/
# (git-ignored), for tests/gpu/run.sh to install there without internet. The device tool carries the folder
# when a run names it: carry ["tests/gpu/wheels"].
#
#   bash tests/gpu/fetch_wheels.sh            # Python 3.12 x86-64, what the GPU image runs
#   PY_VERSION=3.11 bash tests/gpu/fetch_wheels.sh
#
# The image (/work/.library/device/KINDS.md) has torch, transformers, grpcio, protobuf, msgpack, safetensors,
# tokenizers, typer, rich, prometheus-client, httpx, jinja2, pyyaml, pytest; it lacks fastapi, uvicorn,
# pydantic, starlette, grpcio-health-checking, pytest-timeout (run.sh bounds each test) and the openai client. Versions are those of this checkout's
# .venv where it has them (the combination the CPU suite passes with), else the newest. grpcio and protobuf come
# too: afd/wire/generated checks their minimums at import, which the image's copies may not meet; anyio and
# typing-extensions because starlette/openai/pydantic need newer ones than an image may hold; transformers so
# that tests/gpu compares with the same reference version as the CPU suite (constraints/cpu.txt), not the
# image's (its needs, huggingface-hub, tokenizers, safetensors, regex, are in the image).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=tests/gpu/wheels
PY_VERSION=${PY_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}
LOCAL_PYTHON=${LOCAL_PYTHON:-.venv/bin/python}
PACKAGES=(
  fastapi starlette pydantic pydantic-core annotated-types typing-inspection typing-extensions opentelemetry-api
  uvicorn anyio sniffio idna h11
  openai httpx2 httpcore2 truststore jiter distro
  grpcio grpcio-health-checking protobuf
  transformers
  pytest-timeout
)
# AFD_GPU_EXTRA_WHEELS="flashinfer-python==X" brings more.
read -r -a EXTRA <<< "${AFD_GPU_EXTRA_WHEELS:-}"

pinned() {  # NAME==VERSION from the local venv, or NAME alone where it lacks the package
  local name=$1 version=""
  if [[ -x $LOCAL_PYTHON ]]; then
    version=$("$LOCAL_PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  fi
  if [[ -n $version ]]; then echo "$name==$version"; else echo "$name"; fi
}

rm -rf "$DEST"
mkdir -p "$DEST"
specs=()
for name in "${PACKAGES[@]}"; do specs+=("$(pinned "$name")"); done
specs+=("${EXTRA[@]}")
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
echo "downloading for CPython $PY_VERSION x86-64: ${specs[*]}"
# One spec at a time: a name the index lacks (say distro, which newer openai releases dropped) is reported and
# skipped instead of stopping the whole download.
missing=()
for spec in "${specs[@]}"; do
  if ! $PIP download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
      "${platforms[@]}" -d "$DEST" "$spec"; then
    missing+=("$spec")
  fi
done
count=$(find "$DEST" -name '*.whl' | wc -l)
size=$(du -sh "$DEST" | cut -f1)
echo "$count wheels, $size in $DEST"
if (( ${#missing[@]} )); then
  echo "not downloaded: ${missing[*]}" >&2
  # distro is optional (older openai releases only); anything else missing is an error
  for spec in "${missing[@]}"; do [[ $spec == distro* ]] || exit 1; done
fi
