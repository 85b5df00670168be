"""scripts/gpu_check.py (make gpu-check) on the CPU: a failing case is a row with its one-line
reason and the other cases still run; the table and bench/gpu_check.json are written whatever
happens, and a cluster without GPUs (found by asking where the replicas run) is a row saying so."""
import json

from scripts import gpu_check


def _fake(sps: float, acc: float | None = None) -> dict:
    return {"samples_per_s": sps, "train_s": 1.0, "test_accuracy": acc}


def _broken():
    raise RuntimeError("Attempting to deserialize object on a CUDA device\nsecond line of the message")


def test_a_failing_case_is_a_row_with_its_reason_and_the_rest_still_run(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "build_cases", lambda args, gpus, storage: {
        gpu_check.PLAIN: lambda: _fake(1000.0), gpu_check.ONE: lambda: _fake(960.0, 0.9),
        "async, 2 replicas sharing 1 GPU": _broken, "after the failure": lambda: _fake(500.0, 0.8)})
    assert gpu_check.main(["--cpu", "--skip-tests", "--out", str(tmp_path)]) == 1  # a case failed
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    cases = report["cases"]
    assert list(cases) == [gpu_check.PLAIN, gpu_check.ONE, "async, 2 replicas sharing 1 GPU", "after the failure"]
    assert cases["async, 2 replicas sharing 1 GPU"] == {
        "status": "failed", "reason": "RuntimeError: Attempting to deserialize object on a CUDA device"}
    assert cases["after the failure"]["status"] == "ok"
    assert report["one_replica_vs_plain"] == 0.96 and "ok" in cases[gpu_check.ONE]["check"]
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("async, 2 replicas"))
    assert "FAILED: RuntimeError: Attempting to deserialize" in row
    assert any(line.startswith("after the failure") and "0.50x" in line for line in out.splitlines())
    assert ray_cluster.is_initialized(), "the script leaves a cluster it did not start alone"


def test_without_gpus_where_the_replicas_run_the_table_says_so(ray_cluster, tmp_path, capsys):
    assert ray_cluster.cluster_resources().get("GPU", 0) == 0  # the test cluster: CPUs only
    assert gpu_check.main(["--skip-tests", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["probe"]["gpus"] == 0
    assert report["cases"]["GPU cases"]["status"] == "skipped"
    assert "no CUDA device where the replicas run" in capsys.readouterr().out


def test_a_checkpoint_with_tensors_off_the_cpu_fails_its_row(tmp_path):
    import torch

    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "ok.pt")
    assert gpu_check.load_without_cuda(str(tmp_path)) == {"files": 1}
    torch.save({"model": {"w": torch.zeros(2, device="meta")}}, tmp_path / "bad.pt")
    rows = gpu_check.run_cases({"checkpoint loaded without CUDA": lambda: gpu_check.load_without_cuda(str(tmp_path))})
    row = rows["checkpoint loaded without CUDA"]
    assert row["status"] == "failed" and "tensors off the CPU" in row["reason"] and "\n" not in row["reason"], row
