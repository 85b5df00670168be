"""What work on the other core costs a 1-thread training loop (docs/benchmarks.md, the 1-replica
CLI case): the plain loop of scripts/benchmark.py alone, then beside a process that keeps the
other core busy ``--busy`` of the time (512x512 float64 matmuls in 20 ms bursts), alternated for
``--rounds`` rounds. Prints one line per round: samples/s alone, beside the neighbour, the ratio.

    python scripts/neighbour_cost.py --rounds 3 --busy 0.2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NEIGHBOUR = """
import sys, time
import numpy as np
a, burst = np.random.rand(512, 512), 0.02
pause = burst * (1 / float(sys.argv[1]) - 1)
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < burst:
        a @ a
    time.sleep(pause)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy", type=float, default=0.2, help="the neighbour's busy share of its core (default 0.2)")
    p.add_argument("--steps", type=int, default=800)
    args = p.parse_args()
    import benchmark

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for _ in range(args.rounds):
        alone = benchmark.case_plain(1, 64, args.steps, 50)["samples_per_s"]
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(args.busy)], env=env)
        try:
            time.sleep(0.5)  # the neighbour's numpy import
            beside = benchmark.case_plain(1, 64, args.steps, 50)["samples_per_s"]
        finally:
            neighbour.kill()
            neighbour.wait()
        print(f"alone {alone:,.0f} samples/s, beside a neighbour busy {args.busy:.0%}: {beside:,.0f} "
              f"({beside / alone:.3f})", flush=True)


if __name__ == "__main__":
    main()
