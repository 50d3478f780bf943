"""GPU claiming (epmq.device) with mocked CUDA device counts: one claim per process, reused by later callers;
a CUDA_VISIBLE_DEVICES list claimed among its entries; unusable lock files skipped; jobs granted no GPU stay on
the CPU. The whole-DAG runs with mocked devices are in tests/test_gpu_dag.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import epmq.device as device
from epmq.errors import EPMQError


@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """A fresh claim state, locks in a private folder, and a settable number of mocked CUDA devices."""
    monkeypatch.setenv("EPMQ_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("EPMQ_GPU_WAIT_S", "0")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    held = list(device._held)
    monkeypatch.setattr(device, "_state", {"claimed": None, "granted": None})
    count = {"n": 0}
    monkeypatch.setattr(device, "_cuda_count", lambda: count["n"])

    def set_count(n):
        count["n"] = n

    yield set_count
    for fd in device._held[len(held):]:
        os.close(fd)
    del device._held[len(held):]


def _hold(lock_dir, name):
    """A separate process holding the lock of GPU ``name`` until killed."""
    code = ("import sys, time; import epmq.device as d; "
            f"d.claim_gpu([{name!r}], lock_dir={str(lock_dir)!r}, wait_s=0); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_one_claim_per_process_reused_by_later_callers(gpus, tmp_path):
    gpus(1)
    first = device.resolve("auto")
    assert first == torch.device("cuda:0")
    # the suite's evaluation asks again in the same job: same device, no second lock (it would wait on itself)
    assert device.resolve("cuda") == first
    assert device.resolve("auto") == first
    assert len(os.listdir(tmp_path / "locks")) == 1


def test_second_process_takes_the_next_free_gpu(gpus, tmp_path):
    gpus(2)
    holder = _hold(tmp_path / "locks", "0")
    try:
        assert device.resolve("cuda") == torch.device("cuda:1")
    finally:
        holder.kill()
        holder.wait()


def test_all_gpus_busy_is_a_clear_error(gpus, tmp_path):
    gpus(1)
    holder = _hold(tmp_path / "locks", "0")
    try:
        with pytest.raises(EPMQError, match=r"no free GPU among \['0'\] after 0 s"):
            device.resolve("auto")
    finally:
        holder.kill()
        holder.wait()


def test_visible_device_list_is_claimed_among_its_entries(gpus, monkeypatch, tmp_path):
    """CUDA_VISIBLE_DEVICES=3,5: the locks are named by the physical devices, so jobs with the same list (or
    a job started with all devices visible) coordinate; index 1 of the list is cuda:1 in this process."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    gpus(2)
    holder = _hold(tmp_path / "locks", "3")
    try:
        assert device.resolve("auto") == torch.device("cuda:1")
        assert sorted(os.listdir(tmp_path / "locks")) == ["epmq-gpu-3.lock", "epmq-gpu-5.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_uuid_entries_make_safe_lock_names(gpus, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2e/a, MIG-1:2")
    gpus(2)
    assert device.resolve("cuda") == torch.device("cuda:0")
    assert os.listdir(tmp_path / "locks") == ["epmq-gpu-GPU-8f2e_a.lock"]


def test_one_visible_device_is_trusted_without_a_lock(gpus, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # e.g. Slurm's --gpus=1
    gpus(1)
    assert device.resolve("cuda") == torch.device("cuda:0")
    assert not (tmp_path / "locks").exists() or not os.listdir(tmp_path / "locks")


def test_empty_visible_list_means_cpu(gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    gpus(0)
    assert device.resolve("auto") == torch.device("cpu")
    with pytest.raises(EPMQError, match="device=cuda: no CUDA device"):
        device.resolve("cuda")


def test_unusable_lock_file_is_skipped_with_a_warning(gpus, tmp_path, caplog):
    gpus(2)
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "epmq-gpu-0.lock").mkdir()  # cannot be opened as a file, as another user's 600 file
    with caplog.at_level("WARNING", logger="epmq.device"):
        assert device.resolve("auto") == torch.device("cuda:1")
    assert "epmq-gpu-0.lock cannot be opened" in caplog.text and "skipping this GPU" in caplog.text


def test_permission_denied_lock_file_is_skipped(gpus, monkeypatch, tmp_path, caplog):
    gpus(2)
    real_open = os.open

    def deny_gpu0(path, *a, **kw):
        if str(path).endswith("epmq-gpu-0.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(device.os, "open", deny_gpu0)
    with caplog.at_level("WARNING", logger="epmq.device"):
        assert device.resolve("cuda") == torch.device("cuda:1")
    assert "Permission denied" in caplog.text


def test_no_usable_lock_at_all_is_a_clear_error(gpus, tmp_path):
    gpus(1)
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "epmq-gpu-0.lock").mkdir()
    with pytest.raises(EPMQError, match="no usable GPU lock among \\['0'\\].*set EPMQ_LOCK_DIR"):
        device.resolve("auto")


def test_job_granted_no_gpu_stays_on_cpu(gpus, tmp_path):
    gpus(4)
    device.grant(0)
    assert device.resolve("auto") == torch.device("cpu")
    with pytest.raises(EPMQError, match="granted no GPU"):
        device.resolve("cuda")
    assert not (tmp_path / "locks").exists()
    device.grant(1)
    assert device.resolve("auto") == torch.device("cuda:0")


def test_explicit_and_cpu_devices_take_no_lock(gpus, tmp_path):
    gpus(2)
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.resolve("cuda:1") == torch.device("cuda:1")
    assert not (tmp_path / "locks").exists()
    with pytest.raises(EPMQError, match="expected auto, cpu, cuda or cuda:N"):
        device.resolve("gpu")


def test_claim_waits_for_a_gpu_to_free_up(gpus, monkeypatch, tmp_path):
    gpus(1)
    holder = _hold(tmp_path / "locks", "0")
    t0 = time.monotonic()
    try:
        subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(1.5); os.kill({holder.pid}, 9)"])
        monkeypatch.setenv("EPMQ_GPU_WAIT_S", "30")
        assert device.resolve("auto") == torch.device("cuda:0")
    finally:
        holder.kill()
        holder.wait()
    assert 1.0 < time.monotonic() - t0 < 30
