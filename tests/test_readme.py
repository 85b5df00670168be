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
    documented = set(re.findall(r"^\| `(--[a-z-]+)", table, flags=re.M))
    actual = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert documented == actual, (sorted(actual - documented), sorted(documented - actual))


def test_quick_start_is_the_two_make_commands():
    text = _readme()
    start = text[text.index("## Quick start"):]
    assert "make train" in start and "make test" in start
