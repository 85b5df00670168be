"""ray_train.cluster's process tuning, checked in a fresh interpreter (the test process's own
allocator settings are whatever earlier tests left)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps of net B, then the minor page faults of 30 steady-state steps, as JSON.
PROBE = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
from ray_train.cluster import tune_malloc
tuned = tune_malloc() if {tune} else None
import numpy as np, torch, torch.nn.functional as F
from models import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model("net_b")
opt = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
def step():
    opt.zero_grad(set_to_none=False)
    F.cross_entropy(model(x), y).backward()
    opt.step()
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(json.dumps({{"tuned": tuned, "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30}}))
"""


def _probe(tune: bool) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=ROOT, tune=tune)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_keeps_step_buffers_mapped():
    tuned = _probe(True)
    assert tuned["tuned"] is True
    # Every step allocates and frees the same buffers: tuned, they stay mapped (measured ~0);
    # glibc's defaults give hundreds to over a thousand faults a step for net B.
    assert tuned["faults_per_step"] < 20, tuned
    untuned = _probe(False)
    assert untuned["faults_per_step"] > 10 * max(tuned["faults_per_step"], 1), (tuned, untuned)


def test_importing_meanwhile_runs_the_work_and_raises_import_errors_after_it():
    from ray_train.cluster import importing_meanwhile

    done = []
    importing_meanwhile(("json", "csv"), lambda: done.append(1))
    assert done == [1] and "csv" in sys.modules
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):
        importing_meanwhile(("json", "no_such_module_here"), lambda: done.append(2))
    assert done == [1, 2]  # the work ran to the end first
