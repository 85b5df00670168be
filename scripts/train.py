"""Same CLI as ``python -m ray_train``; the entrypoint for ``ray job submit``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ray_train.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
