#!/usr/bin/env bash
# The GPU checks as one call on a lent GPU machine (see docs and shared/notes/gpu-device.md):
# the `gpu`-marked tests, then benches/bench_gpu.py, each under its own timeout, logs in $OUT;
# where numba is importable (its wheels carried in .whl/), also the compiled engine's tests and
# benches/bench_compiled.py, the CPU baseline on the same host.
# The machine has CuPy, numpy and pytest but no network: wheels travel in .whl/ (carry it; the
# carry limit is 64 MiB in all: numba + llvmlite + msgspec for Python 3.12 are 61 MiB, the
# server's wheels (sanic, pyzmq, ...) about 8 MB more, so carry one set or the other).
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

if python3 -c 'import numba' 2>/dev/null; then
    timeout 240 python3 -m pytest -p no:benchmark -p no:cacheprovider -q -n 8 \
        tests/engine/test_compiled_engine.py >"$OUT/compiled-tests.log" 2>&1
    echo "compiled engine tests rc=$?" >>"$OUT/summary.txt"
    timeout 420 python3 benches/bench_compiled.py --json "$OUT/compiled.json" \
        >"$OUT/compiled.md" 2>"$OUT/compiled.err"
    echo "bench_compiled rc=$?" >>"$OUT/summary.txt"
    # rolling statistics (issue 13): GPU vs the compiled engine on the same host, N = 1e7
    timeout 180 python3 benches/bench_rolling.py --gpu --repeats 5 --json "$OUT/rolling.json" \
        >"$OUT/rolling.md" 2>"$OUT/rolling.err"
    echo "bench_rolling rc=$?" >>"$OUT/summary.txt"
fi

cat "$OUT/gpu.txt" "$OUT/summary.txt"
tail -n 3 "$OUT/gpu-tests.log"
[ -f "$OUT/compiled-tests.log" ] && tail -n 2 "$OUT/compiled-tests.log"
[ -f "$OUT/compiled.md" ] && cat "$OUT/compiled.md"
[ -f "$OUT/rolling.md" ] && cat "$OUT/rolling.md"
