"""Bad input: one line on stderr naming the problem, exit status 2, no traceback."""
import os
import subprocess
import sys

import pytest

from ray_train.cli import main
from tests.conftest import ROOT, one_line_error

BAD_FLAGS = [
    (["--model", "resnet9000"], "model.name"),
    (["--dataset", "cifar"], "data.dataset"),
    (["--optimizer", "lbfgs"], "optim.optimizer"),
    (["--strategy", "gossip"], "run.strategy"),
    (["--schedule", "cosine"], "optim.schedule"),
    (["--replicas", "0"], "resources.replicas"),
    (["--replicas", "-2"], "resources.replicas"),
    (["--batch-size", "0"], "run.batch_size"),
    (["--epochs", "-1"], "run.epochs"),
    (["--lr", "0"], "optim.lr"),
    (["--cpus-per-replica", "0"], "resources.cpus_per_replica"),
    (["--gpus-per-replica", "-1"], "resources.gpus_per_replica"),
    (["--eval-every", "0"], "run.eval_every"),
    (["--replicas", "two"], "--replicas"),
    (["--config", "/nonexistent/job.yaml"], "file not found"),
    (["--lr", "nan"], "optim.lr: must be a finite number"),
    (["--lr", "inf"], "optim.lr: must be a finite number"),
    (["--momentum", "nan"], "optim.momentum: must be a finite number"),
    (["--weight-decay", "inf"], "optim.weight_decay: must be a finite number"),
    (["--dataset", "idx:/nonexistent/fashion"], "/nonexistent/fashion"),
]


@pytest.mark.parametrize("argv,needle", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag(capsys, argv, needle):
    assert needle in one_line_error(capsys, argv)


def test_unknown_value_lists_allowed_values(capsys):
    line = one_line_error(capsys, ["--model", "resnet9000"])
    assert "model.name" in line and "net_b" in line and "mlp30" in line


@pytest.mark.parametrize("text,needle", [
    ("run: {epochs: 3\n", "malformed YAML"),
    ("run:\n  epochs: 3\n   bad indent: [\n", "malformed YAML"),
    ("run: {epochz: 3}\n", "unknown key 'epochz'"),
    ("training: {epochs: 3}\n", "unknown section 'training'"),
    ("- just\n- a list\n", "mapping"),
    ("run: {epochs: three}\n", "run.epochs"),
])
def test_bad_config_file(capsys, tmp_path, text, needle):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert needle in one_line_error(capsys, ["--config", str(path)])


def test_cli_flags_override_yaml(tmp_path):
    from ray_train.cli.train import parse_config

    path = tmp_path / "job.yaml"
    path.write_text("run: {epochs: 7, batch_size: 32}\nmodel: {name: net_c}\n")
    cfg, _ = parse_config(["--config", str(path), "--epochs", "2", "--expand"])
    assert (cfg.run.epochs, cfg.run.batch_size, cfg.model.name, cfg.data.expand) == (2, 32, "net_c", True)


def test_more_replicas_than_the_cluster_fails_fast(capsys, ray_cluster, tmp_path):
    line = one_line_error(capsys, ["--replicas", "5", "--storage", str(tmp_path), "--no-tensorboard"])
    assert "5 CPU asked" in line and "2 CPU" in line


def test_gpus_on_a_cluster_without_gpus_fails_fast(capsys, ray_cluster, tmp_path):
    assert "GPU asked" in one_line_error(capsys, ["--gpus-per-replica", "1", "--storage", str(tmp_path)])


@pytest.mark.parametrize("entry", [["-m", "ray_train"], ["scripts/train.py"]])
def test_real_process_exit_status_and_help(entry):
    bad = subprocess.run([sys.executable, *entry, "--model", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "model.name" in bad.stderr
    assert "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "COLUMNS": "120"})
    assert ok.returncode == 0
    for flag in ("--strategy", "--replicas", "--gpus-per-replica", "--config", "--eval-every"):
        assert flag in ok.stdout


def test_a_config_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"run: {epochs: 3}\n# \xff\xfe latin-1 \xe9t\xe9\n")
    assert "is not UTF-8 text" in one_line_error(capsys, ["--config", str(path)])


def test_storage_that_is_a_file(capsys, tmp_path):
    path = tmp_path / "runs"
    path.write_text("not a folder")
    assert str(path) in one_line_error(capsys, ["--storage", str(path), "--epochs", "1"])


def test_data_errors_come_before_ray_and_are_the_only_output(capsys, tmp_path):
    """A corrupt IDX file: the one error line is all the user sees (Ray never starts)."""
    import ray

    folder = tmp_path / "fashion"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"\x00\x00\x08\x03 truncated")
    started = ray.is_initialized()
    assert main(["--dataset", f"idx:{folder}", "--storage", str(tmp_path / "runs"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ray_train: error:") and "train-images-idx3-ubyte" in err[0], err
    assert ray.is_initialized() == started


def test_help_lists_the_texts_options(capsys):
    import pytest as _pytest

    with _pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--validation", "--standardize", "--loss", "--init", "--l1", "--l2-lambda", "--l2-cost", "--max-norm",
                 "--overfit-check", "--schedule"):
        assert flag in out, flag
