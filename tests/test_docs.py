"""The docs tell the truth about the code: the CLI reference is generated from the flag
definitions and current, every relative link resolves, the README stays short, its quick start is
the two make commands and its Python example runs."""
import glob
import importlib.util
import os
import re

from ray_train import strategies
from tests.conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def _read(*parts) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


def _pages() -> list[str]:
    pages = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    return pages + glob.glob(os.path.join(ROOT, "ray_train", "**", "README.md"), recursive=True)


def test_the_cli_reference_is_generated_and_current():
    spec = importlib.util.spec_from_file_location("cli_reference", os.path.join(ROOT, "scripts", "cli_reference.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    text = ref.render()
    assert _read("docs", "cli.md") == text, "docs/cli.md is out of date: run python scripts/cli_reference.py"
    from ray_train.cli import train

    flags = {s for a in train.build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    documented = set(re.findall(r"^\| `(--[a-z0-9-]+)", text.split("## python -m ray_train compare")[0], flags=re.M))
    assert documented == flags, (sorted(flags - documented), sorted(documented - flags))


def test_every_relative_link_in_the_docs_resolves():
    pages = _pages()
    assert len(pages) >= 10
    checked = 0
    for page in pages:
        for target in LINK.findall(open(page, encoding="utf-8").read()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)}: broken link {target}"
            checked += 1
    assert checked > 20


def test_every_strategy_has_its_page_linked_from_docs_strategies():
    index = _read("docs", "strategies.md")
    for s in strategies.all_strategies():
        folder = type(s).__module__.split(".")[-1]
        assert f"../ray_train/strategies/{folder}/README.md" in index, s.name


def test_the_readme_is_short_and_starts_with_the_two_make_commands():
    text = _read("README.md")
    assert len(text.splitlines()) <= 250
    start = text[text.index("## Quick start"):]
    start = start[:start.index("\n## ", 3)]
    assert "make train" in start and "make test" in start


def _shape(line: str) -> str:
    """A printed line with its numbers and spacing made generic: what the docs promise of it."""
    return " ".join(re.sub(r"\d[\d,.]*", "#", line).split())


def test_the_readme_sample_output_is_what_a_run_prints(tmp_path):
    """The quick start's lines come from a real run: a 1-epoch run of the same job, as `make train`
    runs it (its own process, RAY_ADDRESS unset: a local cluster of its own), prints lines of
    exactly their shapes (numbers aside), and nothing else of Ray's."""
    import subprocess
    import sys

    text = _read("README.md")
    block = text[text.index("<!-- sample:begin -->") + 21:text.index("<!-- sample:end -->")]
    sample = [line.strip() for line in block.strip().splitlines() if line.strip() != "..."]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "ray_train", "--config", os.path.join(ROOT, "configs", "default.yaml"),
                           "--epochs", "1", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # storage "runs", as make train
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    printed = [_shape(line) for line in done.stdout.splitlines()]
    assert len(sample) == 8
    for line in sample:
        assert _shape(line) in printed, line
    assert printed[0] == _shape(sample[0])  # which cluster, first


def test_the_own_model_and_data_example_runs(ray_cluster, tmp_path, monkeypatch, capsys):
    text = _read("README.md")
    block = text[text.index("<!-- example:begin -->"):text.index("<!-- example:end -->")]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the example writes runs/blobs where it runs
    exec(compile(code, "README example", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[-1].split(",")[0])
    assert accuracy > 0.9 and "stopped: epochs" in out  # 4 separable classes
    assert (tmp_path / "runs" / "blobs" / "summary.json").exists()
