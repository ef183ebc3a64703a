"""Start a real ``tritonserver`` on loopback for a model repository: ``atedm-export serve`` and the tests.

The binary comes from an NGC Triton install (``/opt/tritonserver``), from ``nvidia-pytriton``'s wheel
(which bundles ``tritonserver`` with the Python backend, and runs on a CPU), or from
``ATEDM_TRITONSERVER``. What it takes to start it outside a container, as found here:

- the Python backend's stub must sit in the server's ``backends/python/``; pytriton keeps one stub per
  Python version aside, so a backend folder is assembled with the stub of the running interpreter;
- the stub runs the model's Python with the first ``python3`` on ``PATH``, so this interpreter's
  ``bin/`` goes first: the served models import atedm-export, torch and onnxruntime from this environment;
- ``LD_LIBRARY_PATH`` needs this interpreter's ``libpython`` first (else the stub picks an older
  system one and the model fails to initialize) and the wheel's ``nvidia_pytriton.libs`` (else the
  server hangs at start).

Serving leaves the repository exactly as deploy wrote it. The stub imports each ``model.py`` in an
interpreter set up isolated (``PyConfig_InitIsolatedConfig``: ``PYTHONDONTWRITEBYTECODE`` and every other
``PYTHON*`` variable are ignored, as was seen here), so Python writes a ``__pycache__`` beside each ``model.py``
it can. Deploy's models carry a file of that name in each version folder (``layout.BYTECODE_GUARD``), so
Python cannot write there; other models in a shared repository do not. So the server is given a mirror of the
repository in its temporary folder: the models the deploy record lists are links to their folders (live: a
version added or removed there is seen at once), every other model's model and version folders are made anew
with every file a link, so what Python writes for them stays in the temporary folder.

The mirror follows the repository while the server runs (``sync``, twice a second): a model that appears there
(``deploy --next-version`` adds one for a graph a new schedule has) appears in the mirror, and one removed there
is removed here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import AtedmError
from .layout import RECORD

ENV_VAR = "ATEDM_TRITONSERVER"
#: Explicit model control, every model loaded at start: the router can then reload a stage model whose
#: process died (``pb_utils.load_model``). Any server of a deployed repository should run with these.
MODEL_CONTROL = ("--model-control-mode", "explicit", "--load-model", "*")
#: The same flags as typed in a shell (the ``*`` quoted), for what the README and errors tell people to run.
SHELL_CONTROL = " ".join(f"'{flag}'" if flag == "*" else flag for flag in MODEL_CONTROL)


SHM_FOLDER = "/dev/shm"  # where the Python backend's shared-memory regions live (POSIX shm on Linux)


class TritonServerError(AtedmError):
    """No server binary here, or the server did not come up (the message quotes its first error)."""


@dataclass(frozen=True)
class ServerInstall:
    """Where a ``tritonserver`` install keeps what it needs."""

    root: Path  # holds bin/tritonserver and backends/

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> list[Path]:
        """Bundled shared libraries (pytriton's wheel keeps them beside the package)."""
        bundled = self.root.parent.parent / "nvidia_pytriton.libs"
        return [bundled] if bundled.is_dir() else []

    def python_stub(self) -> Path:
        """The Python backend stub for this interpreter's version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        for candidate in (self.root / "python_backend_stubs" / version / "triton_python_backend_stub",
                          self.root / "backends" / "python" / "triton_python_backend_stub"):
            if candidate.is_file():
                return candidate
        raise TritonServerError(f"{self.root} has no Python backend stub for Python {version}")


def find_server() -> ServerInstall:
    """The first ``tritonserver`` found: $ATEDM_TRITONSERVER, this environment's, pytriton's, NGC's, PATH."""
    candidates: list[Path] = []
    if os.environ.get(ENV_VAR):
        given = Path(os.environ[ENV_VAR])
        candidates.append(given.parent.parent if given.name == "tritonserver" and given.is_file() else given)
    candidates.append(Path(sys.prefix) / "triton" / "pytriton" / "tritonserver")  # tools/setup.sh puts it here
    spec = importlib.util.find_spec("pytriton")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "tritonserver")
    candidates.append(Path("/opt/tritonserver"))
    on_path = shutil.which("tritonserver")
    if on_path:
        candidates.append(Path(on_path).resolve().parent.parent)
    for root in candidates:
        if (root / "bin" / "tritonserver").is_file():
            return ServerInstall(root)
    raise TritonServerError(
        f"no tritonserver found; run tools/setup.sh (it unpacks nvidia-pytriton's server into .venv/triton), "
        f"use the NGC Triton container, or set {ENV_VAR} to a folder holding bin/tritonserver"
    )


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ignore SIGINT while shutting down (main thread only; elsewhere signals are not ours to set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse ports that are the same or already taken, before the server starts.

    A ``tritonserver`` that finds its port taken exits only after its Python backend has made a ``python_env_*``
    folder under ``/tmp`` (a fixed path, whatever ``TMPDIR`` says) that it never removes and that no name ties to
    this server; so the port is tried here, where nothing has been made yet.
    """
    if len(set(ports.values())) < len(ports):
        raise TritonServerError(f"the {' and '.join(ports)} ports are both {next(iter(ports.values()))}; "
                                "expected a different port for each")
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no owner
            try:
                sock.bind((host, port))
            except OSError as error:
                raise TritonServerError(f"the {name} port {host}:{port} cannot be used ({error.strerror}); "
                                        f"expected a free port (pick another with --{name.lower()}-port)") from None


def _link_tree(source: Path, target: Path, depth: int, whole: Collection[str] = ()) -> None:
    """``target`` as ``source``: folders ``depth`` levels deep made anew (an entry named in ``whole``: a link),
    everything below and every file a link. A folder is made under a hidden name and renamed into place, so the
    server never sees it half made."""
    if depth == 0 or not source.is_dir():
        target.symlink_to(source)
        return
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for child in source.iterdir():
        if child.name in whole:
            (partial / child.name).symlink_to(child)
        else:
            _link_tree(child, partial / child.name, depth - 1)
    partial.rename(target)


def _sync_tree(source: Path, target: Path, depth: int, whole: Collection[str] = ()) -> None:
    """Bring the mirror ``target`` up to ``source``: what appeared there is linked or made here, what went is removed."""
    if depth <= 1:  # a version folder's contents are links already: live
        return
    names = {p.name for p in source.iterdir()}
    for child in list(target.iterdir()):
        if child.name not in names:
            _remove(child)
    for name in sorted(names):
        mirrored = target / name
        if not os.path.lexists(mirrored):
            if name in whole:
                mirrored.symlink_to(source / name)
            else:
                _link_tree(source / name, mirrored, depth - 1)
        elif mirrored.is_dir() and not mirrored.is_symlink():
            _sync_tree(source / name, mirrored, depth - 1)


def _remove(path: Path) -> None:
    """Remove a link, a file or a folder of the mirror."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _deployed_models(repository: Path) -> frozenset[str]:
    """The models the repository's deploy record lists (none where it has no readable record)."""
    try:
        models = json.loads((repository / RECORD).read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return frozenset()
    return frozenset(name for name in models if isinstance(name, str) and "/" not in name and name not in (".", ".."))


class TritonServer:
    """One ``tritonserver`` process serving ``repository`` on loopback; a context manager that always stops it."""

    def __init__(self, repository: str | Path, http_port: int = 0, grpc_port: int = 0, host: str = "127.0.0.1",
                 install: ServerInstall | None = None, log_path: Path | None = None) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository {repository} does not exist")
        self.install = install or find_server()
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self._tmp: Path | None = None  # backends folder and default log, made by start(), removed by stop()
        # The Python backend's shared-memory regions (/dev/shm) carry this server's own prefix, so stop() removes
        # exactly the regions it made, even where the server died before it could (a port already taken).
        self.shm_prefix = f"atedm_{os.getpid()}_{secrets.token_hex(4)}_"
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log = ""
        self._following: threading.Event | None = None  # set to stop the thread that keeps the mirror in sync

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def log_path(self) -> Path | None:
        return self._log_path or (self._tmp / "tritonserver.log" if self._tmp else None)

    def _backends(self) -> Path:
        """A backend folder whose Python backend has the stub of this interpreter's version."""
        assert self._tmp is not None
        folder = self._tmp / "backends"
        shutil.copytree(self.install.root / "backends", folder)
        stub = folder / "python" / "triton_python_backend_stub"
        if not stub.exists():
            shutil.copy2(self.install.python_stub(), stub)
        return folder

    def _mirror(self) -> Path:
        """The repository as the server sees it (see the module's notes): writes into it stay in the temporary folder."""
        assert self._tmp is not None
        folder = self._tmp / "repository"
        # the repository, its model folders, their version folders; deploy's models linked whole
        _link_tree(self.repository, folder, depth=3, whole=_deployed_models(self.repository))
        return folder

    def sync(self) -> None:
        """Bring the server's mirror up to the repository: models added or removed there since."""
        if self._tmp is not None:
            _sync_tree(self.repository, self._tmp / "repository", depth=3, whole=_deployed_models(self.repository))

    def _follow(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            try:
                self.sync()
            except OSError:  # a folder renamed or removed while we read it: the next round sees it settled
                continue

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [sysconfig.get_config_var("LIBDIR") or "", *map(str, self.install.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def command(self) -> list[str]:
        return [
            str(self.install.binary), "--model-repository", str(self._mirror()),
            "--backend-directory", str(self._backends()),
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--allow-metrics", "false", "--exit-timeout-secs", "10", "--strict-readiness", "true",
            "--disable-auto-complete-config",  # configs are complete: no extra Python stub per model at load
            "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}",
            *MODEL_CONTROL,  # explicit control: the router reloads a stage model whose process died
        ]

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and wait until every model is ready; on failure, stop it and quote its error."""
        check_ports(self.host, {"HTTP": self.http_port, "gRPC": self.grpc_port})
        self._tmp = Path(tempfile.mkdtemp(prefix="atedm-triton-"))
        assert self.log_path is not None
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise TritonServerError(f"tritonserver exited with status {self.returncode}: {self.first_error()}")
            if self.ready():
                self._following = threading.Event()
                threading.Thread(target=self._follow, args=(self._following,), daemon=True,
                                 name="atedm-mirror").start()
                return self
            time.sleep(0.25)
        self.stop()
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f}s: {self.first_error()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return self._log

    def first_error(self) -> str:
        """The server's first model-load failure, else its first error, else the end of its log; one line."""
        lines = [line for line in self.log().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("E") and not any(w in line.lower() for w in ("cuda", "nvml"))]
        loads = [line for line in errors if "failed to load" in line]
        line = (loads or errors or lines[-1:] or ["(no output)"])[0]
        return line.split("] ", 1)[-1].strip('"').split("\\n")[0][:600]  # drop the log prefix and Python's "At:" trace

    def stop(self) -> None:
        """SIGINT to the server (graceful), SIGKILL to its process group if it lingers; idempotent.

        The log stays readable through ``log()`` after the temporary folder is gone.
        """
        process, self.process = self.process, None
        with _no_interrupts():  # a second Ctrl-C must not leave the server running
            self._shutdown(process)

    def _shutdown(self, process: subprocess.Popen[bytes] | None) -> None:
        if self._following is not None:
            self._following.set()
            self._following = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the Python backend's stubs, and a hung server
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            self.returncode = process.returncode
        self._log = self.log()
        for region in Path(SHM_FOLDER).glob(f"{self.shm_prefix}*"):  # ours by name: left where the server died
            region.unlink(missing_ok=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
