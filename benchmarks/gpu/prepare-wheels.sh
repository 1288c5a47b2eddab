#!/usr/bin/env bash
# Download the wheels the GPU kit carries into .gpu-wheels/ (git-ignored) and rewrite
# benchmarks/gpu/wheels.lock.json. Run once where PyPI is reachable (not on the GPU
# machine), from anywhere in the checkout:
#
#     bash benchmarks/gpu/prepare-wheels.sh
#
# Python 3.12, CPython, manylinux x86_64: the lent GPU image (benchmarks/gpu/image-packages.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu-wheels
mkdir -p .gpu-wheels
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -d .gpu-wheels -r benchmarks/gpu/wheels.txt
"$PY" -m exlsp.benchmarks.gpu_kit lock
du -sh .gpu-wheels
