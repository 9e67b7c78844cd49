#!/usr/bin/env bash
# Builds the FlashInfer peer of the speculative benchmark: FlashInfer's chain_speculative_sampling
# kernel (bench/peers/flashinfer_chain.cu) as a shared library with no Python or torch dependency.
#
#   bench/peers/build_flashinfer_chain.sh [OUTDIR]     (default .whl, which the GPU check carries)
#
# Run it on a machine with nvcc and a package index (not the GPU machine, which has neither an
# index nor the time): it downloads the pinned flashinfer-python wheel for FlashInfer's headers and
# the nvidia-curand wheel for cuRAND's device headers, and compiles for FLASHINFER_CHAIN_ARCH
# (default sm_90a, the H100). The library links the CUDA runtime statically. Writes
# OUTDIR/flashinfer_chain_sampling.so and OUTDIR/flashinfer_chain_sampling.json (what was built from
# what), which bench/peers/flashinfer_chain.py loads.
set -euo pipefail

FLASHINFER_VERSION=0.7.2.post1
CURAND_VERSION=10.4.5.25
ARCH=${FLASHINFER_CHAIN_ARCH:-sm_90a}
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}

cd "$(dirname "$0")/../.."
OUTDIR=${1:-.whl}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m pip download --quiet --no-deps -d "$WORK/wheels" \
  "flashinfer-python==$FLASHINFER_VERSION" "nvidia-curand==$CURAND_VERSION"
"$PYTHON" - "$WORK" <<'PY'
import sys, zipfile
from pathlib import Path

work = Path(sys.argv[1])
for wheel in (work / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            # FlashInfer's kernel headers and cuRAND's device headers, nothing else.
            if name.startswith("flashinfer/data/include/flashinfer/") or (
                    name.startswith("nvidia/") and "/include/curand" in name):
                archive.extract(name, work / "unpacked")
PY
CURAND_INCLUDE=$(dirname "$(find "$WORK/unpacked/nvidia" -name curand_kernel.h | head -n 1)")

"$NVCC" -O3 -std=c++17 -arch="$ARCH" -shared -Xcompiler -fPIC -cudart static \
  -I "$WORK/unpacked/flashinfer/data/include" -I "$CURAND_INCLUDE" \
  bench/peers/flashinfer_chain.cu -o "$OUTDIR/flashinfer_chain_sampling.so"

NVCC_VERSION=$("$NVCC" --version | tail -n 1)
cat > "$OUTDIR/flashinfer_chain_sampling.json" <<JSON
{"flashinfer_python": "$FLASHINFER_VERSION", "nvidia_curand": "$CURAND_VERSION", "arch": "$ARCH",
 "nvcc": "$NVCC_VERSION", "built": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
JSON
echo "built $OUTDIR/flashinfer_chain_sampling.so (flashinfer-python $FLASHINFER_VERSION, $ARCH)"
