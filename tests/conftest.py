"""Shared fixtures. Ray starts slowly, so one local cluster serves the whole session; tests that
need Ray ask for ``ray_cluster``. Everything runs on CPU."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RAY_CPUS = 2


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from ray_train.cluster import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray(num_cpus=RAY_CPUS)
    yield ray
    ray.shutdown()
