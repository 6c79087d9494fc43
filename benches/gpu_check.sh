#!/usr/bin/env bash
# The GPU checks as one call on a lent GPU machine (see docs and shared/notes/gpu-device.md):
# the `gpu`-marked tests, then benches/bench_gpu.py, each under its own timeout, logs in $OUT.
# The machine has CuPy, numpy and pytest but no network: the appliance's other wheels travel in
# .whl/ (carry it). numba is not there (its llvmlite wheel alone is 60 MB), so the compiled CPU
# engine's tests are left out and `auto` falls back to numpy on that machine.
#
#   run: bash benches/gpu_check.sh            (with carry: [".whl"])
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
export CUPY_CACHE_DIR=/tmp/cupy-cache PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/install.log" 2>&1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c 'import cupy, numpy; print("cupy", cupy.__version__, "numpy", numpy.__version__)' >>"$OUT/gpu.txt" 2>&1

timeout 300 python3 -m pytest -p no:benchmark -p no:cacheprovider -q -m gpu -n 8 \
    tests/engine tests/appliance/test_engine_select.py \
    --ignore=tests/engine/test_compiled_engine.py >"$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?" >>"$OUT/summary.txt"

timeout 240 python3 benches/bench_gpu.py --n "${BENCH_N:-100000000}" >"$OUT/bench_gpu.md" 2>"$OUT/bench_gpu.err"
echo "bench_gpu rc=$?" >>"$OUT/summary.txt"

cat "$OUT/gpu.txt" "$OUT/summary.txt"
tail -n 3 "$OUT/gpu-tests.log"
cat "$OUT/bench_gpu.md"
