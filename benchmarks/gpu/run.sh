#!/usr/bin/env bash
# The GPU proof in one command (benchmarks/gpu_kit.py): a bare lent GPU machine to results
# in at most 9 minutes; each stage writes its part to $OUT as soon as it is done.
#
#     bash benchmarks/gpu/run.sh             # there, with .gpu-wheels carried
#     bash benchmarks/gpu/run.sh --plan      # anywhere: stages, commands, budgets, checks
#     bash benchmarks/gpu/run.sh --with-7b   # also the 7B architecture, if time is left
#     bash benchmarks/gpu/run.sh --with-converter  # also time exllamav2's converter on 1.5B
#     bash benchmarks/gpu/run.sh --exl3      # the EXL3 run: exllamav3's extension (beside
#                                            # exllamav2's), tiny and 1.5B EXL3 models by its
#                                            # converter, tests/test_gpu_exllamav3.py, and the
#                                            # 1.5B bench beside exllamav2 (a run of its own)
#
# A lent machine gets it as one call: command `bash benchmarks/gpu/run.sh`, carry
# [".gpu-wheels"] (prepare-wheels.sh fills it), timeout 600 s. $OUT comes back with
# gpu-kit.json (commit it as benchmarks/results/gpu-kit-<gpu>.json), kit.log,
# tests.xml and gpu-bench.json. Where the tree has no .git, EXLSP_COMMIT=<sha> names it.
#
# `exlsp.*` is imported from the checkout's folders through a shim (the project is not
# installed there). PYTHON picks the interpreter (default python3: the image's, with torch).
set -u
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WORK=${EXLSP_KIT_WORK:-/tmp/exlsp-kit}
mkdir -p "$WORK/shim/exlsp"
for d in completion server index benchmarks; do ln -sfn "$PWD/$d" "$WORK/shim/exlsp/$d"; done
export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 EXLSP_KIT_PYTHON="$("$PY" -c 'import sys; print(sys.executable)')"
if [ -z "${EXLSP_COMMIT:-}" ] && command -v git >/dev/null && git rev-parse HEAD >/dev/null 2>&1; then
    export EXLSP_COMMIT="$(git rev-parse HEAD)"
fi
exec "$PY" -m exlsp.benchmarks.gpu_kit --work "$WORK" "$@"
