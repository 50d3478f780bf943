"""Mocked CUDA devices for whole-DAG tests on a CPU machine (put this folder on ``PYTHONPATH``).

With ``EPMQ_FAKE_CUDA=N`` set, every Python process that imports ``epmq.device`` sees N CUDA devices (fewer
when ``CUDA_VISIBLE_DEVICES`` names fewer, as CUDA itself does), claims them with the real lock-file code,
and computes on the CPU: ``epmq.device._cuda_count`` and ``epmq.device._device_for`` are the only two functions
replaced. Each claim, each device handed out and each process's exit are appended as JSON lines to
``$EPMQ_FAKE_CUDA_LOG`` (pid, time, device index and name, the job's log file), so a test can check that no
job claimed twice and that jobs running at the same time held distinct devices.
"""

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_N = os.environ.get("EPMQ_FAKE_CUDA")
_LOG = os.environ.get("EPMQ_FAKE_CUDA_LOG")


def _record(event: str, **kw) -> None:
    if _LOG:
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **kw}) + "\n"
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _patch(mod) -> None:
    n = int(_N)
    real_claim = mod.claim_gpu

    def cuda_count() -> int:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        return n if env is None else min(n, len([s for s in env.split(",") if s.strip()]))

    def device_for(index: int):
        import torch

        names = mod.visible_devices(cuda_count())
        _record("device", index=index, name=names[index], job=_job())
        return torch.device("cpu")

    def claim_gpu(devices, **kw):
        i = real_claim(devices, **kw)
        _record("claim", index=i, job=_job())
        return i

    mod._cuda_count, mod._device_for, mod.claim_gpu = cuda_count, device_for, claim_gpu
    atexit.register(lambda: _record("exit", job=_job()))


def _job() -> str | None:
    """The Snakemake job's log file, when this process is a job's script."""
    sm = sys.modules.get("__main__")
    sm = getattr(sm, "snakemake", None)
    return str(sm.log[0]) if sm is not None and sm.log else None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "epmq.device":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if _N:
    sys.meta_path.insert(0, _Finder())
