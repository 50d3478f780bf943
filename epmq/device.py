"""Pick the device a job computes on.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once; it does not say *which* GPU a
local job should use. So a job claims one itself: when a scheduler (Slurm, a container runtime) has set
``CUDA_VISIBLE_DEVICES``, that choice is trusted and the job uses the first visible GPU; otherwise the job
takes an exclusive lock file per GPU (``$EPMQ_LOCK_DIR`` or the temp folder) and holds it until it exits,
so concurrent local jobs land on different GPUs. Without CUDA everything runs on the CPU.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from epmq.errors import EPMQError

_held: list = []  # open lock files, kept for the life of the process


def claim_gpu(n_devices: int, *, lock_dir: str | os.PathLike | None = None, wait_s: float = 3600.0) -> int:
    """Index of a GPU no other local epmq job holds (blocks up to ``wait_s`` until one frees up)."""
    import fcntl

    if n_devices < 1:
        raise EPMQError("claim_gpu: no GPU to claim")
    folder = Path(lock_dir or os.environ.get("EPMQ_LOCK_DIR") or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        for i in range(n_devices):
            f = open(folder / f"epmq-gpu-{i}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            _held.append(f)
            return i
        if time.monotonic() > deadline:
            raise EPMQError(f"no free GPU among {n_devices} after {wait_s:.0f} s (locks in {folder})")
        time.sleep(1.0)


def resolve(device: str = "auto"):
    """``"auto"`` (a free GPU, else CPU), ``"cpu"``, ``"cuda"`` (a free GPU, error without one) or an
    explicit ``"cuda:N"`` -> ``torch.device``."""
    import torch

    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    if device not in ("auto", "cuda"):
        raise EPMQError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        if device == "cuda":
            raise EPMQError("device=cuda: no CUDA device is available (use device: auto or cpu)")
        return torch.device("cpu")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return torch.device("cuda:0")
    return torch.device(f"cuda:{claim_gpu(torch.cuda.device_count())}")
