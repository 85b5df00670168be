"""ray_train.cluster's process tuning, checked in a fresh interpreter (the test process's own
allocator settings are whatever earlier tests left)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# malloc and free a 48 MB block, then page faults of doing it twice more, as JSON. Above 32 MB,
# glibc's own adaptive threshold never stops mmapping such a block afresh (12,288 faults each
# time): only raised thresholds keep it.
BLOCK = r"""
import ctypes, json, resource, sys
sys.path.insert(0, {root!r})
from ray_train.cluster import tune_malloc
tuned = tune_malloc() if {tune} else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def cycle(n=48 * 2**20):
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    libc.free(p)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
cycle()
cycle()
print(json.dumps({{"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _run(source: str) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_keeps_freed_memory_mapped():
    tuned, untuned = (_run(BLOCK.format(root=ROOT, tune=t)) for t in (True, False))
    assert tuned["tuned"] is True
    assert untuned["faults"] >= 2 * 12000, untuned  # mapped afresh every time
    assert tuned["faults"] < 100, tuned  # kept: the second and third use fault nothing


def test_importing_meanwhile_runs_the_work_and_raises_import_errors_after_it():
    from ray_train.cluster import importing_meanwhile

    done = []
    importing_meanwhile(("json", "csv"), lambda: done.append(1))
    assert done == [1] and "csv" in sys.modules
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        importing_meanwhile(("json", "no_such_module_here"), lambda: done.append(2))
    assert done == [1, 2]  # the work ran to the end first
