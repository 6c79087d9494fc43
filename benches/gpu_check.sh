#!/usr/bin/env bash
# The GPU checks as one call on a lent GPU machine (see docs and shared/notes/gpu-device.md):
# the `gpu`-marked tests, benches/bench_gpu.py (JSON in $OUT/bench_gpu.json), then
# benches/bench_rolling.py --gpu where it exists, each under its own timeout, logs in $OUT;
# where numba is importable (its wheels carried in .whl/), also the compiled engine's and the
# hybrid engine's tests and benches/bench_compiled.py, the CPU baseline on the same host.
# bench_gpu.py measures every engine next to the compiled `cpu` engine and the hybrid built on
# it, so it needs numba: without .whl it is skipped and the summary says so.
# The machine has CuPy, numpy and pytest but no network: wheels travel in .whl/ (carry it; the
# carry limit is 64 MiB in all: numba + llvmlite + msgspec for Python 3.12 are 61 MiB, the
# server's wheels (sanic, pyzmq, ...) about 8 MB more, so carry one set or the other).
#
# The stages' timeouts add up to under 600 s, one run's limit; bench_compiled.py (7 minutes)
# runs only with COMPILED_BENCH=1, in a run of its own.
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
has_numba=0
python3 -c 'import numba' 2>/dev/null && has_numba=1

# Without numba the hybrid engine cannot be built: its tests and parameters are left out.
select=(-m gpu --ignore=tests/engine/test_compiled_engine.py)
[ "$has_numba" = 1 ] || select+=(--ignore=tests/engine/test_hybrid.py -k "not hybrid")
timeout 120 python3 -m pytest -p no:benchmark -p no:cacheprovider -q -n 8 \
    tests/engine tests/appliance/test_engine_select.py "${select[@]}" >"$OUT/gpu-tests.log" 2>&1
echo "gpu tests rc=$?" >>"$OUT/summary.txt"

if [ "$has_numba" = 1 ]; then
    timeout 150 python3 -m pytest -p no:benchmark -p no:cacheprovider -q -n 8 \
        tests/engine/test_compiled_engine.py tests/engine/test_hybrid.py >"$OUT/compiled-tests.log" 2>&1
    echo "compiled + hybrid engine tests rc=$?" >>"$OUT/summary.txt"
    timeout 200 python3 benches/bench_gpu.py --n "${BENCH_N:-100000000}" \
        >"$OUT/bench_gpu.json" 2>"$OUT/bench_gpu.err"
    echo "bench_gpu rc=$? ($(tail -n 1 "$OUT/bench_gpu.err"))" >>"$OUT/summary.txt"
else
    echo "bench_gpu skipped: numba not importable (carry .whl with numba and llvmlite)" >>"$OUT/summary.txt"
fi

if [ -f benches/bench_rolling.py ]; then
    timeout 90 python3 benches/bench_rolling.py --gpu >"$OUT/bench_rolling.txt" 2>&1
    echo "bench_rolling --gpu rc=$?" >>"$OUT/summary.txt"
fi

if [ "$has_numba" = 1 ] && [ "${COMPILED_BENCH:-0}" = 1 ]; then
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
exit 0
