"""CheckpointStore without Ray: atomic writes, the last N kept, a corrupt or truncated newest file
reported by name with the previous checkpoint used instead, and run.json for --resume."""
import os

import pytest
import torch

from ray_train.errors import CheckpointError, UserError
from ray_train.run.checkpoint import CheckpointStore, load_checked, read_run_file, write_run_file


def _state(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"epoch": i, "step": 10 * i, "history": [{"epoch": e + 1, "test_accuracy": None} for e in range(i)],
            "model": {"w": torch.randn(3, 4, generator=g)}, "rng": [torch.get_rng_state()]}


def _store(tmp_path, keep=3):
    warnings = []
    return CheckpointStore(str(tmp_path), keep=keep, warn=warnings.append), warnings


def test_save_and_load_round_trip(tmp_path):
    store, warnings = _store(tmp_path)
    path = store.save(2, _state(2))
    assert os.path.basename(path) == "ckpt-000002.pt"
    state, loaded_from = store.load_latest()
    assert loaded_from == path and warnings == []
    assert (state["epoch"], state["step"], len(state["history"])) == (2, 20, 2)
    torch.testing.assert_close(state["model"]["w"], _state(2)["model"]["w"], rtol=0, atol=0)
    assert torch.equal(state["rng"][0], _state(2)["rng"][0])


def test_only_the_last_n_are_kept(tmp_path):
    store, _ = _store(tmp_path, keep=2)
    for i in range(1, 6):
        store.save(i, _state(i))
    assert [os.path.basename(p) for p in store.paths()] == ["ckpt-000004.pt", "ckpt-000005.pt"]
    assert store.load_latest()[0]["epoch"] == 5


def test_a_failed_write_leaves_the_previous_file_and_no_debris(tmp_path, monkeypatch):
    store, _ = _store(tmp_path)
    store.save(1, _state(1))
    before = open(store.paths()[0], "rb").read()

    def half_then_crash(obj, fh):
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        store.save(1, _state(7))
    assert sorted(os.listdir(store.dir)) == ["ckpt-000001.pt"]  # no temporary file left behind
    assert open(store.paths()[0], "rb").read() == before
    with pytest.raises(OSError):
        store.save(2, _state(2))
    assert [os.path.basename(p) for p in store.paths()] == ["ckpt-000001.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_newest_checkpoint_names_the_file_and_the_previous_is_used(tmp_path, damage):
    store, warnings = _store(tmp_path)
    store.save(1, _state(1))
    newest = store.save(2, _state(2))
    data = open(newest, "rb").read()
    replacement = {"truncated": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 40, "empty": b""}
    with open(newest, "wb") as fh:
        fh.write(replacement[damage])
    with pytest.raises(CheckpointError, match="ckpt-000002.pt is corrupt or truncated") as err:
        load_checked(newest)
    assert newest in str(err.value) and "\n" not in str(err.value)
    state, path = store.load_latest()
    assert path.endswith("ckpt-000001.pt") and state["epoch"] == 1
    assert len(warnings) == 1 and newest in warnings[0] and "falling back" in warnings[0]


def test_every_checkpoint_damaged_gives_none_and_a_warning_each(tmp_path):
    store, warnings = _store(tmp_path)
    for i in (1, 2):
        with open(store.save(i, _state(i)), "wb") as fh:
            fh.write(b"junk")
    assert store.load_latest() is None
    assert [w.split()[1] for w in warnings] == [store.paths()[1], store.paths()[0]]


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that would run arbitrary code on load is an error."""
    path = str(tmp_path / "evil.pt")
    torch.save({"epoch": 1, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checked(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_checked(path)


class _Payload:
    pass


def test_no_checkpoint_folder_means_none(tmp_path):
    store, warnings = _store(tmp_path)
    assert store.paths() == [] and store.load_latest() is None and warnings == []


def test_run_file_round_trip_and_bad_folders(tmp_path):
    write_run_file(str(tmp_path), "sync", {"run": {"epochs": 2}})
    assert read_run_file(str(tmp_path)) == {"strategy": "sync", "config": {"run": {"epochs": 2}}}
    with pytest.raises(UserError, match="no such run folder"):
        read_run_file(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a ray_train run folder"):
        read_run_file(str(tmp_path / "empty"))
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        read_run_file(str(tmp_path))
