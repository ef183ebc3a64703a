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

Serving leaves the repository exactly as deploy wrote it, and the server reads it in place. The stub imports
each ``model.py`` in an interpreter set up isolated (``PyConfig_InitIsolatedConfig``: ``PYTHONDONTWRITEBYTECODE``
and every other ``PYTHON*`` variable are ignored, as was seen here), so Python would write a ``__pycache__``
beside each ``model.py``, changing the version's time stamp: Triton then reloads that version each time its
model is loaded again (as ``rollout`` does). So deploy puts a file named ``__pycache__`` in every Python model's
version folder (``repository.BYTECODE_GUARD``): Python cannot make its cache folder there and keeps the bytecode
in memory, as it does on a read-only disk.
"""

from __future__ import annotations

import importlib.util
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import AtedmError

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

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [sysconfig.get_config_var("LIBDIR") or "", *map(str, self.install.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def command(self) -> list[str]:
        return [
            str(self.install.binary), "--model-repository", str(self.repository),
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
