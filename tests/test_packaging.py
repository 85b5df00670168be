"""``pip install .`` installs ray_train (every subpackage) and models, with the ``ray-train``
console script; the editable install that ``make`` does lets a script in any folder import them."""
import os
import subprocess
import sys
import zipfile

from tests.conftest import ROOT


def test_the_wheel_holds_every_module_and_the_console_script(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), ROOT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    sources = {os.path.relpath(os.path.join(d, f), ROOT) for top in ("ray_train", "models")
               for d, _, files in os.walk(os.path.join(ROOT, top)) for f in files if f.endswith(".py")}
    assert len(sources) > 50 and sources <= names, sorted(sources - names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ray-train = ray_train.cli:main" in zipfile.ZipFile(tmp_path / wheel).read(entry).decode()


def test_a_script_outside_the_checkout_imports_the_package(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import ray_train, models, ray_train.strategies.sync; "
                           "print(ray_train.__file__, models.__file__)"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [os.path.join(ROOT, "ray_train", "__init__.py"), os.path.join(ROOT, "models", "__init__.py")]
