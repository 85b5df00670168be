"""The README's CLI reference lists every flag the CLI has, and nothing it lacks."""
import os
import re

from ray_train.cli import build_parser
from tests.conftest import ROOT


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as fh:
        return fh.read()


def test_every_flag_is_documented_and_every_documented_flag_exists():
    text = _readme()
    table = text[text.index("<!-- flags:begin"):text.index("<!-- flags:end")]
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)", table, flags=re.M))
    actual = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert documented == actual, (sorted(actual - documented), sorted(documented - actual))


def test_quick_start_is_the_two_make_commands():
    text = _readme()
    start = text[text.index("## Quick start"):]
    assert "make train" in start and "make test" in start


def test_the_own_model_and_data_example_runs(ray_cluster, tmp_path, monkeypatch, capsys):
    text = _readme()
    block = text[text.index("<!-- example:begin -->"):text.index("<!-- example:end -->")]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the example writes runs/blobs where it runs
    exec(compile(code, "README example", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[-1].split(",")[0])
    assert accuracy > 0.9 and "stopped: epochs" in out  # 4 separable classes
    assert (tmp_path / "runs" / "blobs" / "summary.json").exists()
