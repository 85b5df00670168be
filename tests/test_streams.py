"""Streamed data (issue 20, docs/data.md): an image folder and parquet files the tests write,
ray.data datasets handed to fit, trained by the strategies that stream; the streamed run against
the in-memory run of the same images; resume at an epoch boundary; every bad input one line.

Ray Data starts slowly: the runs are few, tiny (3 classes of 16x16 PNG) and shared through
module fixtures. The runs leave --cpus-per-replica at its default: a streamed run shrinks the
replicas' share so that Ray Data's reading tasks keep a CPU (tested here too)."""
import json
import os

import numpy as np
import pytest
import torch

from ray_train.cli import main
from tests.conftest import one_line_error

CLASSES = ("circle", "square", "stripe")
PER_CLASS = {"train": 32, "test": 8}
# No --cpus-per-replica: on the suite's 2-CPU cluster a streamed run's 2 replicas take 0.5 CPU each by themselves
COMMON = ["--model", "mlp30", "--batch-size", "8", "--replicas", "2", "--lr", "0.1", "--seed", "3", "--no-progress",
          "--no-tensorboard"]


def _image(c: int, rng) -> np.ndarray:
    img = (rng.random((16, 16)) * 60).astype(np.uint8)
    if c == 0:
        img[4:12, 4:12] += 150
    elif c == 1:
        img[:, :5] += 150
    else:
        img[::3] += 150
    return img


def write_images(root, per_class=PER_CLASS, seed=0) -> dict:
    """DIR/<split>/<class>/<i>.png; returns the same images as arrays {split: (x [N,1,16,16], y)}
    in the order the folder sorts them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in per_class.items():
        xs, ys = [], []
        for c, name in enumerate(CLASSES):
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(k):
                img = _image(c, rng)
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
                xs.append(img[None])
                ys.append(c)
        arrays[split] = (np.stack(xs), np.array(ys, dtype=np.int64))
    return arrays


def write_parquet(path, arrays: dict, label_type=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"x": [], "y": [], "split": []}
    for split, (x, y) in arrays.items():
        rows["x"] += [v.astype(np.float32).ravel() / 255 for v in x]
        rows["y"] += list(y)
        rows["split"] += [split] * len(y)
    y = pa.array(rows["y"], type=label_type) if label_type else pa.array(rows["y"])
    pq.write_table(pa.table({"x": pa.array([list(v) for v in rows["x"]], type=pa.list_(pa.float32())), "y": y,
                             "split": rows["split"]}), path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, write_images(root)


def _fit_cli(storage, name, *args):
    assert main([*COMMON, "--storage", str(storage), "--run-name", name, *args]) == 0
    return json.loads((storage / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def sync_run(ray_cluster, folder, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    summary = _fit_cli(storage, "straight", "--dataset", f"images:{folder[0]}", "--epochs", "2")
    return storage, summary


@pytest.fixture(scope="module")
def file_run(ray_cluster, folder, tmp_path_factory):
    """The same run reading the files every epoch (--stream-cache 0: the path of data larger than
    the object store's share), each epoch's shards cut by one streaming_split."""
    storage = tmp_path_factory.mktemp("file-runs")
    return storage, _fit_cli(storage, "straight", "--dataset", f"images:{folder[0]}", "--epochs", "2",
                             "--stream-cache", "0")


@pytest.fixture(params=["stored", "files"])
def either_run(request):
    """(storage, summary, extra flags) of the sync run with its data read into the object store
    once (the default for small data) and of the one reading the files every epoch."""
    stored = request.param == "stored"
    storage, summary = request.getfixturevalue("sync_run" if stored else "file_run")
    return storage, summary, [] if stored else ["--stream-cache", "0"]


def test_reading_the_files_every_epoch_trains_as_well(file_run, sync_run):
    assert file_run[1]["test_accuracy"] >= 0.8, file_run[1]["test_accuracy"]
    assert file_run[1]["steps"] == sync_run[1]["steps"]


def test_image_folder_trains_with_sync_and_keeps_the_classes(sync_run):
    storage, summary = sync_run
    assert summary["test_accuracy"] >= 0.8, summary["test_accuracy"]
    assert summary["config"]["resources"]["cpus_per_replica"] == 0.5  # 2 x 1 CPU by default on 2 CPUs: shrunk
    assert summary["steps"] == 2 * (3 * 32 // 2 // 8)  # equal steps per replica: 48 rows each, batch 8
    assert json.loads((storage / "straight" / "classes.json").read_text()) == list(CLASSES)
    model = torch.load(storage / "straight" / "model.pt", map_location="cpu", weights_only=True)
    assert model["class_names"] == list(CLASSES) and model["input_shape"] == [1, 16, 16]


@pytest.mark.parametrize("strategy, extra", [
    # local: 2 epochs are 12 steps, one average at step 8: seed 3 ended at chance (0.33) or 0.63 by
    # the block order; 4 epochs reached 1.0 with seeds 3, 4 and 5
    ("local", ["--epochs", "4"]), ("async", []),
    ("hogwild", ["--lr", "0.05", "--epochs", "3"]),  # lock-free races: at 0.1 x 2 epochs it ended at chance once
    ("sandblaster", ["--lbfgs-iterations", "5", "--work-units", "4", "--lr", "1"]),  # L-BFGS's own rate
])
def test_image_folder_trains_with_the_other_streaming_strategies(ray_cluster, folder, tmp_path, capsys, strategy,
                                                                 extra):
    """With sync (above) and the ensemble (below): an image folder trains with every strategy."""
    summary = _fit_cli(tmp_path, strategy, "--dataset", f"images:{folder[0]}", "--epochs", "2", "--strategy", strategy,
                       *extra)
    assert summary["test_accuracy"] >= 0.6, (strategy, summary["test_accuracy"])
    out = capsys.readouterr().out
    assert "streamed data: each replica takes 0.5 CPU instead of 1, leaving 1 of the cluster's 2 CPUs" in out
    assert "streamed data: train, test read into the object store once" in out  # small: stored


def test_replicas_leave_a_cpu_to_ray_data():
    from ray_train.data.streams import replica_cpus
    from ray_train.errors import ResourceError

    assert replica_cpus(total=8, fixed=0, bundles=2, per=1) == 1  # room already: as asked
    assert replica_cpus(total=2, fixed=0, bundles=2, per=1) == 0.5
    assert replica_cpus(total=4, fixed=0.5, bundles=3, per=1) == 0.83  # rounded down
    with pytest.raises(ResourceError, match="needs 1 CPU free for Ray Data"):
        replica_cpus(total=1, fixed=0, bundles=2, per=1)


def test_image_folder_trains_an_ensemble_with_online_bagging(ray_cluster, folder, tmp_path):
    summary = _fit_cli(tmp_path, "ens", "--dataset", f"images:{folder[0]}", "--epochs", "2", "--strategy", "ensemble",
                       "--members", "2", "--replicas-per-member", "1", "--bagging", "--cpus-per-replica", "0.5")
    assert summary["vote_accuracy"] >= 0.6, summary["vote_accuracy"]
    assert len(summary["members"]) == 2 and all(m["status"] == "ok" for m in summary["members"])


def test_streamed_run_is_as_accurate_as_the_in_memory_run(sync_run, folder, tmp_path):
    """The same images, seed and job from an .npz (in memory): the streamed run is no worse than
    one point below it (one-sided: the two shuffle differently)."""
    arrays = folder[1]
    npz = tmp_path / "same.npz"
    np.savez(npz, x_train=arrays["train"][0], y_train=arrays["train"][1], x_test=arrays["test"][0],
             y_test=arrays["test"][1])
    in_memory = _fit_cli(tmp_path, "in-memory", "--dataset", f"npz:{npz}", "--epochs", "2", "--validation", "0")
    assert sync_run[1]["test_accuracy"] >= in_memory["test_accuracy"] - 0.01


def test_resume_at_an_epoch_boundary_equals_the_uninterrupted_run(either_run, folder):
    storage, _, extra = either_run
    _fit_cli(storage, "resumed", "--dataset", f"images:{folder[0]}", "--epochs", "1", *extra)
    assert main(["--resume", str(storage / "resumed"), "--epochs", "2", "--no-progress", "--no-tensorboard"]) == 0
    a, b = (torch.load(storage / name / "model-last.pt", map_location="cpu", weights_only=True)["model"]
            for name in ("straight", "resumed"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_resume_mid_epoch_skips_the_batches_consumed_and_equals_the_uninterrupted_run(either_run, folder):
    """A run stopped 4 steps into its first epoch of 6 (time limit after the first chunk of 2
    steps; the second was queued already) checkpoints there; resumed, each replica reads the
    epoch's shard again and drops the 4 batches it had trained on."""
    from ray_train.run.checkpoint import CheckpointStore

    storage, _, extra = either_run
    _fit_cli(storage, "mid", "--dataset", f"images:{folder[0]}", "--epochs", "2", "--log-every", "2",
             "--time-limit", "0.001", *extra)
    state = CheckpointStore(str(storage / "mid")).load_latest()[0]
    assert (state["epoch"], state["in_epoch"]) == (0, 4)
    assert main(["--resume", str(storage / "mid"), "--time-limit", "100000", "--no-progress", "--no-tensorboard"]) == 0
    a, b = (torch.load(storage / name / "model-last.pt", map_location="cpu", weights_only=True)["model"]
            for name in ("straight", "mid"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.parametrize("strategy", ["sync", "async"])
def test_parquet_files_with_a_split_column_train(ray_cluster, folder, tmp_path, strategy):
    path = tmp_path / "table"
    path.mkdir()
    for part in (0, 1):  # a folder of two files, each half of every split
        write_parquet(path / f"part-{part}.parquet", {s: (x[part::2], y[part::2]) for s, (x, y) in folder[1].items()})
    summary = _fit_cli(tmp_path, "pq", "--dataset", f"parquet:{path}", "--split-column", "split", "--strategy",
                       strategy, *(["--epochs", "1", "--warm-start-steps", "0"] if strategy == "async" else ["--epochs", "2"]))
    assert summary["test_accuracy"] >= 0.8, (strategy, summary["test_accuracy"])


def test_async_replicas_read_disjoint_shares_that_make_up_the_epoch(ray_cluster):
    """Each async replica reads the epoch's plan on its own and keeps every replicas-th batch:
    the shares of one epoch are disjoint, together every full batch, and repeat for one seed."""
    import ray.data

    from ray_train.data.formats import from_streams
    from ray_train.data.streams import Streams
    from ray_train.worker.stream import TrainStream

    rows = [{"x": np.array([i], np.float32), "y": i % 3} for i in range(40)]
    read = from_streams(Streams(ray.data.from_items(rows, override_num_blocks=5), ray.data.from_items(rows[:6])))
    stored = read.cached()
    assert stored.stored and not read.stored
    for data in (read, stored):  # read through Ray Data each epoch, and taken whole from the stored blocks

        def share(rank, epoch=0):
            stream = TrainStream(data, data.epoch_plan(3, epoch), 4, 3, epoch, rank, torch.device("cpu"),
                                 stride=(rank, 2))
            return [int(v) for _ in range(5) for v in stream.next()[0][:, 0]]

        a, b = share(0), share(1)
        assert not set(a) & set(b) and sorted(a + b) == list(range(40)), data.stored
        assert share(0) == a and share(0, epoch=1) != a  # seeded: the same epoch repeats, the next differs


def test_fit_takes_ray_data_datasets_with_a_transform(ray_cluster, folder, tmp_path):
    import ray.data

    import ray_train

    (x, y), (xt, yt) = folder[1]["train"], folder[1]["test"]
    seen = []

    def scale(batch):  # every split: uint8 pixels to floats in [0, 1]
        return {**batch, "x": batch["x"].astype(np.float32) / 255}

    def jitter(batch):  # training only
        seen.append(len(batch["x"]))
        return batch

    train = ray.data.from_items([{"x": v, "y": int(c)} for v, c in zip(x, y)])
    packed = np.concatenate([xt.reshape(len(xt), -1), yt[:, None]], axis=1).astype(np.int64)  # [N, 257]
    test = ray.data.from_numpy(packed).map_batches(
        lambda b: {"x": b["data"][:, :-1].reshape(-1, 1, 16, 16).astype(np.uint8), "y": b["data"][:, -1]})
    data = ray_train.Streams(train, test, transform=scale, train_transform=jitter)
    summary = ray_train.fit({"run": {"epochs": 3, "batch_size": 8, "storage": str(tmp_path), "seed": 3},
                             "resources": {"replicas": 2, "cpus_per_replica": 0.5}, "optim": {"lr": 0.1}},
                            model="mlp30", data=data, tensorboard=False, progress=False)
    assert summary["test_accuracy"] >= 0.8, summary["test_accuracy"]
    assert summary["dataset"] == "ray.data"


def test_pipelined_replicas_on_a_stream_are_one_line(ray_cluster, folder, capsys, tmp_path):
    err = one_line_error(capsys, ["--dataset", f"images:{folder[0]}", "--stages", "2", "--storage",
                                  str(tmp_path), "--no-progress"])
    assert "pipeline.stages: a streamed dataset" in err, err
    assert not any(tmp_path.iterdir())


# -- bad input: one line, exit 2, no run folder ------------------------------------------------
def _bad(root, name):
    """A copy of a small image folder with one thing broken."""
    from PIL import Image

    write_images(root, {"train": 2, "test": 1})
    if name == "no-test":
        for c in CLASSES:
            for f in (root / "test" / c).iterdir():
                f.unlink()
            (root / "test" / c).rmdir()
        (root / "test").rmdir()
    elif name == "empty-class":
        for f in (root / "train" / "square").iterdir():
            f.unlink()
    elif name == "corrupt":
        (root / "train" / "circle" / "001.png").write_bytes(b"\x89PNG not really")
    elif name == "sizes":
        Image.fromarray(np.zeros((20, 16), np.uint8)).save(root / "train" / "stripe" / "009.png")
    elif name == "unseen":
        (root / "test" / "triangle").mkdir()
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "test" / "triangle" / "0.png")
    return root


@pytest.mark.parametrize("case, needle", [
    ("missing", "folder not found"), ("no-test", "no test/ folder"), ("empty-class", "an empty class folder"),
    ("corrupt", "001.png: not a readable PNG or JPEG image"), ("sizes", "give --image-size H,W"),
    ("unseen", "class 'triangle' is not among the training classes"),
])
def test_bad_image_folders_are_one_line_errors(ray_cluster, tmp_path, capsys, case, needle):
    root = tmp_path / "missing" if case == "missing" else _bad(tmp_path / "data", case)
    storage = tmp_path / "runs"
    err = one_line_error(capsys, ["--dataset", f"images:{root}", "--storage", str(storage), "--no-progress"])
    assert needle in err, err
    assert not storage.exists()


def test_mixed_sizes_train_with_image_size(ray_cluster, tmp_path):
    from ray_train.config import build_config
    from ray_train.data.loaders import load_dataset

    root = _bad(tmp_path / "data", "sizes")
    data = load_dataset(build_config(overrides={"data": {"dataset": f"images:{root}", "image_size": "8,12"}}).data)
    assert data.input_shape == (1, 8, 12) and data.head_inputs().shape == (2, 1, 8, 12)


@pytest.mark.parametrize("case, args, needle", [
    ("columns", ["--feature-column", "pixels"], "no feature column 'pixels'; the columns are x, y, split"),
    ("floats", [], "labels must be integers"),
    ("no-test", ["--split-column", "part"], "no split column 'part'"),
    ("test-path", ["--test-path", "OTHER"], "no column 'y'; the columns are x, label"),
])
def test_bad_parquet_is_one_line_errors(ray_cluster, folder, tmp_path, capsys, case, args, needle):
    import pyarrow as pa

    path = tmp_path / "t.parquet"
    small = {s: (x[::8], y[::8]) for s, (x, y) in folder[1].items()}
    write_parquet(path, small, label_type=pa.float64() if case == "floats" else None)
    if case == "floats":  # 0.5 is no class
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        pq.write_table(table.set_column(1, "y", pa.array([0.5] * table.num_rows)), path)
    if case == "test-path":  # a test split whose label column has another name
        import pyarrow.parquet as pq

        other = tmp_path / "test.parquet"
        pq.write_table(pq.read_table(path).select(["x", "y"]).rename_columns(["x", "label"]), other)
        args = ["--test-path", str(other)]
    storage = tmp_path / "runs"
    argv = ["--dataset", f"parquet:{path}", *(args or ["--split-column", "split"]), "--storage", str(storage),
            "--no-progress"]
    err = one_line_error(capsys, argv)
    assert needle in err, err
    assert not storage.exists()


def test_online_bagging_repeats_each_streamed_example_by_a_seeded_poisson_draw():
    from ray_train.strategies.ensemble.member import EnsembleMember

    member = object.__new__(EnsembleMember)  # only what batch() reads
    member.poisson = True
    x, y = torch.arange(64.0).reshape(64, 1), torch.arange(64)
    draws = []
    for seed in (0, 0, 1):
        member.weights_rng = np.random.default_rng(seed)
        bx, by = member.batch((x, y))
        want = np.random.default_rng(seed).poisson(1.0, 64)
        assert by.tolist() == np.repeat(np.arange(64), want).tolist() and torch.equal(bx[:, 0].long(), by)
        draws.append(by.tolist())
    assert draws[0] == draws[1] != draws[2]  # seeded: the same member repeats, another differs


def test_expand_on_a_stream_shifts_each_example_by_at_most_one_pixel_seeded():
    from ray_train.worker.stream import shift_one_pixel

    x = np.random.default_rng(0).integers(1, 255, (200, 1, 6, 6)).astype(np.uint8)
    out = shift_one_pixel(x, np.random.default_rng(7))
    assert np.array_equal(out, shift_one_pixel(x, np.random.default_rng(7)))
    ways = {"kept": lambda a: a, "up": lambda a: np.pad(a[1:], ((0, 1), (0, 0))),
            "down": lambda a: np.pad(a[:-1], ((1, 0), (0, 0))), "left": lambda a: np.pad(a[:, 1:], ((0, 0), (0, 1))),
            "right": lambda a: np.pad(a[:, :-1], ((0, 0), (1, 0)))}
    seen = [next(k for k, f in ways.items() if np.array_equal(o[0], f(i[0]))) for i, o in zip(x, out)]
    assert set(seen) == set(ways)  # all five, and every example is one of them


def test_standardize_on_a_stream_reads_the_training_split_once(ray_cluster, folder):
    from ray_train.config import build_config
    from ray_train.data.loaders import load_dataset

    data = load_dataset(build_config(overrides={"data": {"dataset": f"images:{folder[0]}", "standardize": True}}).data)
    x = folder[1]["train"][0].astype(np.float64) / 255
    assert np.allclose(data.standardize["mean"], x.mean(0), atol=1e-5)
    std = x.std(0)
    assert np.allclose(data.standardize["std"], np.where(std < 1e-6, 1, std), atol=1e-4)


def test_a_streamed_source_starts_the_cluster_the_run_names_before_ray_data_opens_it(ray_cluster, folder, monkeypatch):
    # Ray Data opening the folder first once started Ray's default cluster (or joined the one `ray
    # start` left): --address was ignored and the run's first line said "ray.init was called before"
    from ray_train import api, cluster
    from ray_train.config import build_config

    calls = []
    monkeypatch.setattr(cluster, "init_ray", lambda **kw: calls.append(kw) or "cluster: the line")
    cfg = build_config(overrides={"data": {"dataset": f"images:{folder[0]}"}})
    assert api._cluster_for_streams(cfg, None, "auto", True) == "cluster: the line"
    assert calls == [{"address": "auto", "verbose": True}]
    assert api._cluster_for_streams(build_config(), None, "auto", True) is None  # arrays: Ray starts with the run
    assert len(calls) == 1
    # fit: the cluster before the data, and the run's first line is what was said then
    order = []
    monkeypatch.setattr(api, "_cluster_for_streams", lambda *a: order.append("cluster") or "cluster: started here")
    monkeypatch.setattr(api, "_with_data", lambda cfg, data: order.append("data") or (_ for _ in ()).throw(SystemExit))
    with pytest.raises(SystemExit):
        api.fit(cfg)
    assert order == ["cluster", "data"]


def test_only_a_stream_that_fits_its_share_of_the_object_store_is_stored(ray_cluster, folder):
    import io

    from ray_train.config import DataConfig
    from ray_train.data.formats import load_stream
    from ray_train.errors import ConfigError

    tiny = load_stream(DataConfig(dataset=f"images:{folder[0]}", stream_cache=1e-12))
    assert tiny.cached(io.StringIO()) is tiny and not tiny.stored  # 120 images > a 1e-12 share: from the files
    out = io.StringIO()
    stored = load_stream(DataConfig(dataset=f"images:{folder[0]}")).cached(out)
    assert stored.stored and "train, test read into the object store once" in out.getvalue()
    assert stored.splits["train"].num_blocks() >= 16  # every replica a different share each epoch
    shards = stored.train_shards(0, 0, 2, None)
    assert [s.count() for s in shards] == [48, 48]
    paths = [sorted(stored.train_shards(0, e, 2, None)[0].columns()["path"]) for e in (0, 1)]
    assert len(paths[0]) == 48 and paths[0] != paths[1]  # each epoch deals the replicas other rows
    with pytest.raises(ConfigError, match="data.stream_cache"):
        DataConfig(stream_cache=1.5)
