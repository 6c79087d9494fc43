"""appliance/heap.py: the glibc settings take effect (page faults of a request-sized buffer
reused warm), and bad values are refused by the config."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from appliance.config import ConfigError, load_config
from appliance.heap import tune_heap

_FAULTS = textwrap.dedent(
    """
    import resource, sys
    from appliance.heap import tune_heap
    print(tune_heap(int(sys.argv[1]), int(sys.argv[2])), file=sys.stderr)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def request():  # a body, an answer and the server's copy of it, freed together
        return [bytearray(1_250_000) for _ in range(3)]
    for _ in range(3):  # warm up
        request()
    before = faults()
    for _ in range(50):
        request()
    print((faults() - before) / 50)
    """
)


def _faults_per_buffer(mmap_threshold: int, trim_threshold: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, str(mmap_threshold), str(trim_threshold)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_the_defaults_reuse_a_request_sized_buffer_without_page_faults() -> None:
    # Three 1.25 MB buffers per "request" (~915 pages): with glibc's own (dynamic) settings
    # the freed top of the heap outgrows its trim threshold and is returned, so the next
    # request faults its pages in again; the configured ones keep it in the heap, warm.
    untuned = _faults_per_buffer(0, 0)
    tuned = _faults_per_buffer(4 * 1024 * 1024, 64 * 1024 * 1024)
    assert untuned > 200
    assert tuned < 5


def test_zero_keeps_glibc_defaults() -> None:
    assert tune_heap(0, 0) == "glibc defaults kept (both settings are 0)"


@pytest.mark.parametrize(
    "key, value", [("HEAP_MMAP_THRESHOLD_BYTES", "-1"), ("HEAP_TRIM_THRESHOLD_BYTES", "4294967296")]
)
def test_out_of_range_settings_are_config_errors(monkeypatch, key: str, value: str) -> None:
    monkeypatch.setenv(f"APP_SERVER__{key}", value)
    with pytest.raises(ConfigError, match=key.lower()):
        load_config(None)
