"""The package's shape (docs/architecture.md): a strategy is one folder plus one registry line,
nothing outside strategies/ names a strategy, and the import graph has no cycle."""
import ast
import io
import json
import os
import subprocess
import sys

import pytest

from ray_train import strategies
from tests.conftest import ROOT

PLUGIN = os.path.join(ROOT, "tests", "plugin")


def _modules(top: str) -> dict[str, str]:
    """module name -> path of every .py file under ROOT/top."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _imports(path: str, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere (module level or inside functions),
    except under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found & known


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    mods = {**_modules("ray_train"), **_modules("models")}
    graph = {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}
    assert sum(len(v) for v in graph.values()) > 100  # the graph is really built
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # and a cycle is really found
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_core_never_imports_a_strategy_and_models_never_import_ray():
    mods = {**_modules("ray_train"), **_modules("models")}
    core = [m for m in mods if m.split(".")[1:2] in (["run"], ["worker"], ["data"], ["metrics"])]
    assert len(core) > 15
    for m in core:
        assert not {i for i in _imports(mods[m], set(mods)) if i.startswith("ray_train.strategies")}, m
    for m in (m for m in mods if m.startswith("models")):
        tree = ast.parse(open(mods[m], encoding="utf-8").read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {i for i in imported if i.split(".")[0] in ("ray", "ray_train")}, m


def _strategy_name_compares(path: str) -> list[str]:
    names = set(strategies.names())
    hits = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left] + node.comparators
        consts = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant) and c.value in names}
        if consts and "strateg" in ast.unparse(node).lower():
            hits.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_nothing_outside_strategies_compares_a_strategy_name(tmp_path):
    outside = [p for m, p in _modules("ray_train").items() if not m.startswith("ray_train.strategies")]
    assert len(outside) > 30
    assert not [h for p in outside for h in _strategy_name_compares(p)]
    planted = tmp_path / "planted.py"  # the check does find what it looks for
    planted.write_text('if cfg.run.strategy == "ensemble":\n    pass\nok = cfg.run.strategy in ("async", "x")\n')
    assert len(_strategy_name_compares(str(planted))) == 2


def test_every_strategy_lives_in_its_folder_with_a_page():
    for s in strategies.all_strategies():
        module = type(s).__module__
        assert module.startswith("ray_train.strategies.") and module.count(".") == 2, module
        folder = os.path.join(ROOT, *module.split("."))
        assert os.path.isfile(os.path.join(folder, "README.md")), folder
        for spec in (s.engine, s.runner):
            if spec and spec.startswith("ray_train.strategies.") and spec != strategies.base.Strategy.runner:
                assert spec.startswith(module + "."), (s.name, spec)
        if s.section is not None:
            assert s.section.__module__.startswith(module + "."), s.section


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.syspath_prepend(PLUGIN)
    strategy = strategies.register("tinyreg")
    yield strategy
    strategies._loaded.pop("tiny", None)


def test_a_strategy_from_outside_trains_through_fit(ray_cluster, tiny, tmp_path):
    from ray_train.api import fit

    assert "tiny" in strategies.names() and strategies.get("tiny") is tiny
    out = io.StringIO()
    summary = fit({"run": {"strategy": "tiny", "epochs": 2, "storage": str(tmp_path), "run_name": "t"},
                   "model": {"name": "mlp30"}, "resources": {"replicas": 1}}, tensorboard=False, progress=False, out=out)
    assert "tiny: 1 replica" in out.getvalue()
    assert summary["strategy"] == "tiny" and summary["epochs"] == 2 and summary["test_accuracy"] > 0.6, summary
    assert (tmp_path / "t" / "model.pt").exists()


def test_a_strategy_from_outside_trains_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": PLUGIN, strategies.PLUGINS_ENV: "tinyreg", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "ray_train", "--strategy", "tiny", "--model", "mlp30", "--replicas", "1",
                           "--epochs", "1", "--lr", "0.5", "--storage", str(tmp_path), "--run-name", "t", "--no-progress",
                           "--no-tensorboard"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["strategy"] == "tiny" and summary["test_accuracy"] > 0.5, summary
    help_text = subprocess.run([sys.executable, "-m", "ray_train", "--help"], env=env, capture_output=True, text=True,
                               timeout=60).stdout
    assert "tiny" in help_text


def test_compare_and_search_take_the_same_output_flags_as_a_run(capsys):
    from ray_train.cli import compare, main, search, train

    def output_flags(parser):
        return {s for a in parser._actions for s in a.option_strings if s in ("--progress", "--no-progress",
                                                                              "--no-tensorboard")}

    assert output_flags(train.build_parser()) == {"--progress", "--no-progress", "--no-tensorboard"}
    assert output_flags(compare.build_parser()) == output_flags(search.build_parser()) == output_flags(train.build_parser())
    # through the whole command line: the flags are accepted and the run stops at the next mistake
    assert main(["compare", "--no-progress", "--no-tensorboard", "--strategies", "nope"]) == 2
    assert "unknown regime 'nope'" in capsys.readouterr().err
    assert main(["search", "--no-progress", "--trials", "0"]) == 2
    assert "--trials: must be at least 1" in capsys.readouterr().err
