"""Predict and evaluate with any run (issue 23 item 2): python -m ray_train predict (and
scripts/evaluate.py over it) on a sync, an async and an ensemble run trained on 3x16x16 images with
class names, from a PNG folder, .npy, .npz and the run's own test split, the run's standardisation
applied; the old failures ("holds no ensemble", "expected [N, 28, 28]", "bad magic number" for a
PNG) now predict; bad input is one line, exit 2."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ray_train
from scripts import evaluate
from tests.conftest import one_line_error

SHAPE, NAMES = (3, 16, 16), ["cat", "dog", "fox", "owl"]
SHOWN = 12  # test images written as PNG files


def pixels(n, rng, protos):
    y = rng.integers(0, len(NAMES), n)
    x = np.clip(protos[y].astype(np.float32) + rng.normal(0, 40, (n, *SHAPE)), 0, 255).astype(np.uint8)
    return x, y


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    """Three tiny runs on one npz of uint8 3x16x16 images with class names: sync (standardised),
    async and a 2-member ensemble."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (len(NAMES), *SHAPE))
    (x_train, y_train), (x_test, y_test) = pixels(480, rng, protos), pixels(120, rng, protos)
    npz = root / "pets.npz"
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array(NAMES))
    out = {}
    for strategy, extra in (("sync", {}), ("async", {}), ("ensemble", {"ensemble": {"members": 2}})):
        cfg = {"run": {"strategy": strategy, "epochs": 2, "batch_size": 16, "storage": str(root), "run_name": strategy},
               "model": {"name": "mlp30"}, "data": {"dataset": f"npz:{npz}", "standardize": strategy == "sync"},
               "resources": {"replicas": 2, "cpus_per_replica": 0.5}, **extra}
        if strategy == "ensemble":
            cfg["resources"] = {"cpus_per_replica": 0.5}
        summary = ray_train.fit(cfg, tensorboard=False, out=io.StringIO())
        assert summary["dataset"] == "pets"
        out[strategy] = (root / strategy, summary)
    return root, x_test, y_test, out


def _predict(capsys, *argv) -> list[str]:
    from ray_train.cli import main

    assert main(["predict", *map(str, argv)]) == 0, capsys.readouterr().err
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("strategy", ["sync", "async", "ensemble"])
def test_predict_from_a_png_folder_and_npy_with_class_names(runs, capsys, tmp_path, strategy):
    root, x_test, y_test, trained = runs
    run_dir, summary = trained[strategy]
    assert summary["test_accuracy"] > 0.8  # the runs learnt (chance 0.25): predictions mean something
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(SHOWN):
        Image.fromarray(x_test[i].transpose(1, 2, 0)).save(folder / f"img_{i:02d}.png")
    np.save(tmp_path / "new.npy", x_test[:SHOWN])
    from_png = _predict(capsys, "--run", run_dir, folder, "--csv", tmp_path / "p.csv")
    from_npy = _predict(capsys, "--run", run_dir, tmp_path / "new.npy")
    assert len(from_png) == SHOWN + 1 and len(from_npy) == SHOWN  # + the "predictions in" line
    assert from_png[0].startswith("img_00.png: ") and from_npy[0].startswith("new.npy[0]: ")
    # the same pixels through both readers: the same classes and probabilities (and votes)
    assert [ln.split(": ", 1)[1] for ln in from_png[:SHOWN]] == [ln.split(": ", 1)[1] for ln in from_npy]
    classes = [ln.split(": ", 1)[1].split(" (")[0] for ln in from_npy]
    assert set(classes) <= set(NAMES)
    assert sum(c == NAMES[y] for c, y in zip(classes, y_test[:SHOWN])) >= SHOWN - 2
    if strategy == "ensemble":
        assert all(len(ln.split("votes ")[1].split()) == 2 for ln in from_npy)
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == SHOWN and rows[0]["input"] == "img_00.png" and rows[0]["class"] in NAMES
    assert [r["class"] for r in rows] == classes
    # labels: by class name in a text file, and from the folders the images sit in
    (tmp_path / "labels.txt").write_text("\n".join(NAMES[y] for y in y_test[:SHOWN]))
    lines = _predict(capsys, "--run", run_dir, tmp_path / "new.npy", "--labels", tmp_path / "labels.txt")
    assert lines[-1].endswith(f"of {SHOWN})") and "accuracy" in lines[-1]
    by_class = tmp_path / "by_class"
    for i in range(SHOWN):
        (by_class / NAMES[y_test[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x_test[i].transpose(1, 2, 0)).save(by_class / NAMES[y_test[i]] / f"{i}.png")
    assert _predict(capsys, "--run", run_dir, by_class)[-1] == lines[-1]


@pytest.mark.parametrize("strategy", ["sync", "async", "ensemble"])
def test_evaluate_mode_reproduces_the_runs_test_accuracy(runs, capsys, strategy):
    """model.pt on the run's own test split, standardised as in training (sync), gives the figure the
    run reported for that very network: best_test_accuracy (an ensemble: its vote's)."""
    _, _, _, trained = runs
    run_dir, summary = trained[strategy]
    result = ray_train.predict(str(run_dir))
    want = summary["test_accuracy"] if strategy == "ensemble" else summary["best_test_accuracy"]
    assert result["accuracy"] == pytest.approx(want, abs=1e-9)
    last = _predict(capsys, "--run", run_dir)[-1]
    assert last.startswith(("hard vote accuracy" if strategy == "ensemble" else "accuracy") + f" {want:.4f}")
    if strategy == "sync":  # the standardisation is what makes it agree
        state = torch.load(run_dir / "model.pt", weights_only=True)
        assert state["standardize"] is not None and state["class_names"] == NAMES


def test_the_quoted_failures_now_predict(runs, capsys, tmp_path):
    root, x_test, y_test, trained = runs
    sync_dir = trained["sync"][0]
    # "holds no ensemble": scripts/evaluate.py on a sync run
    assert evaluate.main(["--run", str(sync_dir)]) == 0
    out = capsys.readouterr().out
    assert "holds no ensemble" not in out and "accuracy" in out
    # "expected [N, 28, 28] ... MNIST-sized images": inputs of the run's own shape
    np.save(tmp_path / "new.npy", x_test[:3])
    assert evaluate.main(["--run", str(sync_dir), "--images", str(tmp_path / "new.npy")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    # "bad magic number" for a PNG: an image is read as one
    Image.fromarray(x_test[0].transpose(1, 2, 0)).save(tmp_path / "one.png")
    assert evaluate.main(["--run", str(sync_dir), "--images", str(tmp_path / "one.png")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("one.png: ") and line.split(": ")[1].split(" (")[0] in NAMES
    # channels-last arrays and an npz with labels are read too
    np.savez(tmp_path / "hwc.npz", x=x_test[:5].transpose(0, 2, 3, 1), y=y_test[:5])
    lines = _predict(capsys, "--run", sync_dir, tmp_path / "hwc.npz")
    assert len(lines) == 6 and "accuracy" in lines[-1]


@pytest.mark.parametrize("make,needle", [
    (lambda t: np.save(t / "bad.npy", np.zeros((2, 28, 28), np.uint8)) or t / "bad.npy",
     "holds an array of shape [2, 28, 28]; the run's model takes inputs of shape [N, 3, 16, 16]"),
    (lambda t: (t / "junk.png").write_bytes(b"\x89PNG not really") and t / "junk.png", "not a readable PNG or JPEG"),
    (lambda t: Image.new("RGB", (32, 32)).save(t / "big.png") or t / "big.png",
     "the image is 32x32 pixels; the run's model takes 16x16"),
    (lambda t: (t / "x.bin").write_bytes(b"garbage!") and t / "x.bin", "bad magic number"),
    (lambda t: t / "missing.npy", "no such file or folder"),
])
def test_bad_inputs_are_one_line_exit_2(runs, capsys, tmp_path, make, needle):
    sync_dir = runs[3]["sync"][0]
    line = one_line_error(capsys, ["predict", "--run", str(sync_dir), str(make(tmp_path))])
    assert needle in line, line


def test_bad_runs_and_flags_are_one_line_exit_2(runs, capsys, tmp_path):
    root, _, _, trained = runs
    assert "no such run folder" in one_line_error(capsys, ["predict", "--run", str(tmp_path / "nope")])
    assert "not a run folder" in one_line_error(capsys, ["predict", "--run", str(tmp_path)])
    line = one_line_error(capsys, ["predict", "--run", str(trained["sync"][0]), "--vote", "soft"])
    assert "holds one network, not an ensemble" in line
    (tmp_path / "l.txt").write_text("cat\nzebra\n")
    np.save(tmp_path / "two.npy", np.zeros((2, *SHAPE), np.uint8))
    line = one_line_error(capsys, ["predict", "--run", str(trained["sync"][0]), str(tmp_path / "two.npy"),
                                  "--labels", str(tmp_path / "l.txt")])
    assert "'zebra' is neither a class index nor one of the run's class names (cat, dog, fox, owl)" in line


def _fake_regression_run(folder, ensemble: bool, model_name="mlp30"):
    """A run folder as a regression run leaves it, built by hand: 2 outputs per example."""
    from models import build_model
    from ray_train.config import build_config

    folder.mkdir()
    cfg = build_config({"model": {"name": "mlp30", "loss": "mse"}}).to_dict()
    cfg["model"]["name"] = model_name
    (folder / "run.json").write_text(json.dumps({"strategy": "x", "config": cfg}))
    nets, paths = [], []
    for k in range(2 if ensemble else 1):
        torch.manual_seed(k)
        net = build_model("mlp30", input_shape=(1, 4, 4), num_classes=2)
        state = {"model": net.state_dict(), "model_name": model_name, "input_shape": [1, 4, 4], "num_classes": None,
                 "standardize": None, "class_names": None, "regression": True, "target_shape": [2]}
        path = f"members/member_{k}/model.pt" if ensemble else "model.pt"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / path)
        nets.append(net.eval())
        paths.append(path)
    if ensemble:
        members = [{"index": k, "model": "mlp30", "seed": k, "status": "ok", "path": p} for k, p in enumerate(paths)]
        (folder / "ensemble.json").write_text(json.dumps({"members": members, "weights": [1.0, 3.0]}))
    return nets


def test_regression_runs_predict_values_and_an_ensemble_averages(capsys, tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 1, 4, 4)).astype(np.float32)
    y = np.zeros((5, 2), np.float32)
    np.savez(tmp_path / "x.npz", x=x, y=y)
    nets = _fake_regression_run(tmp_path / "single", ensemble=False)
    want = nets[0](torch.from_numpy(x)).detach().numpy()
    result = ray_train.predict(str(tmp_path / "single"), str(tmp_path / "x.npz"))
    assert np.allclose([r["prediction"] for r in result["rows"]], want, atol=1e-6)
    assert result["mae"] == pytest.approx(float(np.abs(want).mean()), rel=1e-5)
    lines = _predict(capsys, "--run", tmp_path / "single", tmp_path / "x.npz")
    assert len(lines) == 6 and lines[-1].startswith("mean absolute error")
    nets = _fake_regression_run(tmp_path / "ens", ensemble=True)
    outs = [n(torch.from_numpy(x)).detach().numpy() for n in nets]
    result = ray_train.predict(str(tmp_path / "ens"), x)
    assert np.allclose([r["prediction"] for r in result["rows"]], (outs[0] + 3 * outs[1]) / 4, atol=1e-6)
    line = one_line_error(capsys, ["predict", "--run", str(tmp_path / "ens"), "--vote", "hard"])
    assert "a vote needs class labels; this ensemble's members are regressors" in line


def test_a_run_of_a_python_callable_needs_the_callable(capsys, tmp_path):
    from models import build_model

    _fake_regression_run(tmp_path / "custom", ensemble=False, model_name="custom")
    x = np.zeros((2, 1, 4, 4), np.float32)
    line = one_line_error(capsys, ["predict", "--run", str(tmp_path / "custom"), "--json"])
    assert "trained a Python callable" in line and "ray_train.predict(" in line
    result = ray_train.predict(str(tmp_path / "custom"), x,
                               model=lambda: build_model("mlp30", input_shape=(1, 4, 4), num_classes=2))
    assert len(result["rows"]) == 2


def test_inputs_are_fitted_to_the_runs_shape_and_pixels_scaled_alike(tmp_path):
    from ray_train.run.reload import read_inputs

    img = np.arange(12, dtype=np.uint8).reshape(3, 2, 2) * 20
    Image.fromarray(img.transpose(1, 2, 0)).save(tmp_path / "a.png")
    np.save(tmp_path / "flat.npy", np.full((2, 12), 0.5, np.float32))
    np.save(tmp_path / "ints.npy", img[None].astype(np.int64))
    ins = read_inputs([str(tmp_path / "a.png"), str(tmp_path / "flat.npy")], (3, 2, 2))
    assert ins.x.shape == (3, 3, 2, 2) and ins.x.dtype == np.float32 and ins.labels is None
    assert np.allclose(ins.x[0], img / 255.0) and np.allclose(ins.x[1:], 0.5)  # the PNG's pixels scaled as uint8
    assert ins.names == ["a.png", "flat.npy[0]", "flat.npy[1]"]
    ints = read_inputs([str(tmp_path / "ints.npy")], (3, 2, 2))
    assert ints.x.dtype == np.uint8 and np.array_equal(ints.x[0], img)  # integer pixels are pixels
    Image.fromarray(np.full((2, 2), 200, np.uint8)).save(tmp_path / "grey.jpg")  # JPEG, grey, to 3 channels
    jpeg = read_inputs([str(tmp_path / "grey.jpg")], (3, 2, 2))
    assert jpeg.x.shape == (1, 3, 2, 2) and jpeg.x.dtype == np.uint8 and abs(int(jpeg.x.mean()) - 200) <= 3
