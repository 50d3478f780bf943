"""Pick the device a job computes on: one GPU claim per process, reused by every later caller.

Snakemake's ``--resources gpu=N`` only limits how many GPU jobs run at once; it does not say *which* GPU a
local job should use. So a job claims one itself, the first time anything in the process asks for a GPU
(:func:`resolve` with ``"auto"`` or ``"cuda"``); every later call in the same process (the quantize step,
then the suite's own evaluation, ...) gets the same device back without claiming again.

Which GPUs a claim chooses from:

* ``CUDA_VISIBLE_DEVICES`` names **one** device (a scheduler such as Slurm gave the job its GPU): that
  device (``cuda:0``) is trusted, no lock is taken;
* it names **several** (inside ``salloc``, on a shared workstation) or is unset (every GPU of the machine):
  the job takes an exclusive lock file per device, ``epmq-gpu-<id>.lock`` in ``$EPMQ_LOCK_DIR`` (default:
  the temp folder), where ``<id>`` is the device's name in ``CUDA_VISIBLE_DEVICES`` (an index or a UUID) or
  its index, and holds it until the process exits, so concurrent local jobs land on different devices. A
  lock file the user cannot open (another user's, in a shared temp folder) is skipped with a warning.
  A job waits up to ``$EPMQ_GPU_WAIT_S`` seconds (default 3600) for a free device.

A workflow job states what Snakemake granted it with :func:`grant` (its ``gpu`` resource): a job granted
no GPU computes on the CPU under ``"auto"`` (so a CPU job never takes a GPU that ``--resources gpu=N``
counts for others), and ``"cuda"`` there is an error. Without CUDA everything runs on the CPU.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

from epmq.errors import EPMQError

log = logging.getLogger(__name__)

_held: list[int] = []  # file descriptors of held lock files, kept for the life of the process
_state: dict = {"claimed": None, "granted": None}  # claimed: torch.device; granted: None (no limit) or int


def _cuda_count() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_for(index: int):
    """``torch.device`` of visible CUDA device ``index``."""
    import torch

    return torch.device(f"cuda:{index}")


def visible_devices(n_devices: int) -> list[str]:
    """Names of the ``n_devices`` devices this process sees, in index order: the entries of
    ``CUDA_VISIBLE_DEVICES`` where it is set, else ``"0"``, ``"1"``, ..."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(n_devices)]
    names = [s.strip() for s in env.split(",") if s.strip()]
    return names[:n_devices]


def _lock_name(name: str) -> str:
    return "epmq-gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".lock"


def claim_gpu(devices: int | list[str], *, lock_dir: str | os.PathLike | None = None,
              wait_s: float | None = None) -> int:
    """Index of a device no other local epmq job holds, among ``devices`` (a count, or the devices' names in
    index order); blocks up to ``wait_s`` seconds (default ``$EPMQ_GPU_WAIT_S`` or 3600) until one frees up.
    The lock is held until the process exits. Lock files that cannot be opened are skipped with a warning."""
    import fcntl

    names = [str(i) for i in range(devices)] if isinstance(devices, int) else list(devices)
    if not names:
        raise EPMQError("claim_gpu: no GPU to claim")
    folder = Path(lock_dir or os.environ.get("EPMQ_LOCK_DIR") or tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EPMQError(f"GPU lock folder {folder}: {e.strerror or e} (set EPMQ_LOCK_DIR)") from None
    if wait_s is None:
        wait_s = float(os.environ.get("EPMQ_GPU_WAIT_S", 3600))
    deadline = time.monotonic() + wait_s
    unusable: dict[str, str] = {}
    while True:
        for i, name in enumerate(names):
            path = folder / _lock_name(name)
            try:
                # read-only is enough for flock, so another user's lock file (mode 644) still coordinates
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
            except OSError as e:
                if str(path) not in unusable:
                    unusable[str(path)] = e.strerror or str(e)
                    log.warning("GPU %s: lock file %s cannot be opened (%s); skipping this GPU",
                                name, path, unusable[str(path)])
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            _held.append(fd)
            return i
        if len(unusable) == len(names):
            raise EPMQError(f"no usable GPU lock among {names} in {folder} "
                            f"({'; '.join(f'{p}: {m}' for p, m in unusable.items())}); set EPMQ_LOCK_DIR")
        if time.monotonic() > deadline:
            raise EPMQError(f"no free GPU among {names} after {wait_s:.0f} s (locks in {folder})")
        time.sleep(1.0)


def grant(gpus) -> None:
    """Record how many GPUs the scheduler granted this process (a workflow job's ``gpu`` resource; None:
    no limit, as for the CLI). With 0, ``resolve("auto")`` stays on the CPU and ``resolve("cuda")`` fails."""
    _state["granted"] = None if gpus is None else int(gpus)


def resolve(device: str = "auto"):
    """``"auto"`` (a free GPU, else CPU), ``"cpu"``, ``"cuda"`` (a free GPU, error without one) or an
    explicit ``"cuda:N"`` -> ``torch.device``. The first GPU claim of a process is reused by later calls."""
    import torch

    device = str(device)
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda:"):
        return torch.device(device)
    if device not in ("auto", "cuda"):
        raise EPMQError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if _state["claimed"] is not None:
        return _state["claimed"]
    if _state["granted"] == 0:
        if device == "cuda":
            raise EPMQError("device=cuda: this job was granted no GPU (its rule's resources have gpu=0)")
        return torch.device("cpu")
    n = _cuda_count()
    if n == 0:
        if device == "cuda":
            raise EPMQError("device=cuda: no CUDA device is available (use device: auto or cpu)")
        return torch.device("cpu")
    names = visible_devices(n)
    if not names:
        if device == "cuda":
            raise EPMQError("device=cuda: CUDA_VISIBLE_DEVICES hides every device")
        return torch.device("cpu")
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None and len(names) == 1:
        index = 0  # the scheduler's choice: trusted, no lock
    else:
        index = claim_gpu(names)
    _state["claimed"] = _device_for(index)
    log.info("computing on %s (GPU %s)", _state["claimed"], names[index])
    return _state["claimed"]
