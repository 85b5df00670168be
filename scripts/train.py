"""Same CLI as ``python -m ray_train``; the entrypoint for ``ray job submit``.

Under a job, the head runs this with the Python of the environment ``ray start`` ran in. A head
started outside the project's virtual environment has a Python without torch: that is said in one
line, with what to do, instead of a ModuleNotFoundError from deep in the imports."""
import importlib.util
import os
import sys

NEEDED = ("torch", "numpy", "yaml", "ray")


def missing() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


if __name__ == "__main__" and missing():
    print(f"ray_train: error: this Python ({sys.executable}) has no {', '.join(missing())}: a Ray job runs with the "
          "Python of the environment `ray start --head` ran in. Start the head from the project's virtual "
          "environment (.venv/bin/ray start --head ...; docs/cluster.md), or install requirements.txt into that "
          "Python (pip install -r requirements.txt)", file=sys.stderr, flush=True)
    raise SystemExit(2)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
