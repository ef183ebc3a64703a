"""Call a deployed UNet on a Triton server, over HTTP or gRPC.

``connect(url)`` returns a ``StagedUNet`` whose stage graphs run on the server: a drop-in for
``pipe.unet``, with the build's manifest read from the router model's config, so no build folder is
needed on the client. Each call sends the step and the step count; the server routes the rows and says
which stage ran, and the client checks that against its own reading of the schedule. A multi-shape build's
served UNet takes each of its shapes, as a local ``StagedUNet`` does (the server picks the graphs from the
``sample``; ``generate --width/--height/--batch`` picks the shape a pipeline draws at).
``load_test`` measures latency under concurrency, over every (shape, stage) of the build, and checks every
output against a sequential one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..contract import precision_of
from ..errors import AtedmError, ModelError, first_line
from ..buildfolder import GraphEntry, Manifest, ShapeView, first_view, parse_manifest, view_at, views
from ..runtime.backends import Backend, load_backend
from ..runtime.staged import StagedUNet
from .routing import STAGE_OUTPUT, STEP_INPUTS
from .serving import MANIFEST_PARAMETER

DEFAULT_MODEL = "atedm_unet"
#: A host name, an IPv4 address, or an IPv6 address in brackets: what may stand before ``:PORT``.
HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)$")


class TritonClientError(AtedmError):
    """The server cannot be reached, lacks the model, or refused a request (its message is quoted)."""


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port``, ``grpc://host:port`` or ``host:port`` (HTTP) → (protocol, host:port).

    Checked whole before any client is made: tritonclient's HTTP client, given a port it cannot read,
    raises from its constructor half-built, and its ``__del__`` then fails again at exit (a traceback
    after the one error line).
    """
    protocol, _, address = url.rpartition("://")
    protocol = protocol or "http"
    host, _, port = address.rpartition(":")
    if protocol not in ("http", "grpc") or "/" in address or not HOST.match(host):
        raise TritonClientError(f"Triton URL '{url}' must look like http://HOST:PORT or grpc://HOST:PORT")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise TritonClientError(f"Triton URL '{url}' has port '{port}'; expected a number from 1 to 65535")
    return protocol, address


def client_module(protocol: str) -> ModuleType:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise TritonClientError("calling Triton needs tritonclient: pip install 'atedm-export[triton]'") from None
    return module


class TritonBackend(Backend):
    """Runs each UNet call on the server's router model; the server picks the graph from the step and the
    ``sample``'s shape (``at(view)`` is this backend checking calls against another shape of the build)."""

    name = "triton"
    names = ()  # not chosen by name from a build folder (``connect(url)`` makes it): no entry in the runtime's registry
    opens = ()  # the server opens the build's files; this process holds the manifest it sent

    @classmethod
    def bench_forms(cls, manifest: Manifest) -> tuple[str, ...]:
        """None: ``bench`` times builds here; a served UNet is timed by ``load-test`` (its ``--compare`` beside the
        same graphs run locally)."""
        return ()

    @classmethod
    def reference(cls, form: str, ran: Sequence[str]) -> str:
        return "the served baseline graph"

    def __init__(self, url: str, model: str, manifest: Manifest, client: Any, module: ModuleType) -> None:
        super().__init__(Path("."), first_view(manifest), "cpu")
        self.url, self.model, self.client, self.module = url, model, client, module

    @classmethod
    def connect(cls, url: str, model: str = DEFAULT_MODEL) -> TritonBackend:
        """A backend for the router ``model`` at ``url``; a client that cannot be used is closed, not left to GC."""
        protocol, address = parse_url(url)
        module = client_module(protocol)
        try:
            client = module.InferenceServerClient(address)
        except Exception as exc:  # noqa: BLE001 - what either client library raises for an address it refuses
            raise TritonClientError(f"cannot reach Triton at {url}: {first_line(exc)}") from None
        try:
            manifest = cls._manifest(client, url, model, protocol)
        except BaseException:
            client.close()
            raise
        return cls(url, model, manifest, client, module)

    @staticmethod
    def _manifest(client: Any, url: str, model: str, protocol: str) -> Manifest:
        """The build's manifest, from the router's config on the server."""
        try:
            if not client.is_model_ready(model):
                raise TritonClientError(f"Triton at {url} has no ready model '{model}'")
            config = client.get_model_config(model, **({"as_json": True} if protocol == "grpc" else {}))
        except TritonClientError:
            raise
        except Exception as exc:  # noqa: BLE001 - connection and protocol errors of two client libraries
            raise TritonClientError(f"cannot reach Triton at {url}: {first_line(exc)}") from None
        config = config.get("config", config)
        text = config.get("parameters", {}).get(MANIFEST_PARAMETER, {}).get("string_value")
        if not text:
            raise TritonClientError(f"model '{model}' at {url} is not an atedm-export router (no {MANIFEST_PARAMETER})")
        return parse_manifest(text)

    def inputs(self, feed: dict[str, torch.Tensor]) -> list[Any]:
        """Graph inputs plus step and step count, one row per latent; per-row scalars as ``[b, 1]``."""
        rows = feed["sample"].shape[0]
        wire = []
        for name in (*self.view.input_names, *STEP_INPUTS):
            tensor = feed[name].detach().cpu().contiguous()
            try:
                datatype = precision_of(tensor.dtype).wire
                array = tensor.numpy()
            except (ModelError, TypeError):  # NumPy has no bfloat16: tritonclient cannot send it
                raise TritonClientError(f"input '{name}' is {tensor.dtype}; the Triton client sends fp32, fp16 or int32") from None
            array = array.reshape(rows, 1) if array.ndim == 1 else array
            tensor = self.module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            wire.append(tensor)
        return wire

    def infer(self, feed: dict[str, torch.Tensor], client: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(latent, stage index per row)`` for one request."""
        output = self.view.output_name
        outputs = [self.module.InferRequestedOutput(n) for n in (output, STAGE_OUTPUT)]
        try:
            result = (client or self.client).infer(self.model, self.inputs(feed), outputs=outputs)
        except Exception as exc:  # noqa: BLE001 - InferenceServerException, or the connection dropped
            raise TritonClientError(f"Triton at {self.url}, model '{self.model}': {first_line(exc)}") from None
        return result.as_numpy(output), result.as_numpy(STAGE_OUTPUT).reshape(-1)

    def _run(self, entry: GraphEntry, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        latent, stages = self.infer(feed)
        schedule = self.view.graph_spec.dsap.stages  # the server answers indices in the schedule
        ran = {schedule[int(i)].name if 0 <= int(i) < len(schedule) else f"#{int(i)}" for i in stages}
        if ran != {entry.name}:
            raise TritonClientError(f"the server ran stage {', '.join(sorted(ran))} where this client expected "
                                    f"'{entry.name}': server and client read the schedule differently")
        return torch.from_numpy(latent.copy())  # the client's buffer is read-only

    def release(self) -> None:
        self.client.close()


def connect(url: str, model: str = DEFAULT_MODEL) -> StagedUNet:
    """The served UNet as a ``StagedUNet`` (``attach(pipe)`` it, or call it in a custom loop); a call runs at the
    build's shape its ``sample`` has, as on a local build."""
    backend = TritonBackend.connect(url, model)
    return StagedUNet(backend)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def stage_feeds(backend: TritonBackend, seed: int = 0) -> list[tuple[ShapeView, int, dict[str, torch.Tensor]]]:
    """``(shape's view, step, request)``: one full-batch request at the first step of each non-empty stage of the
    spec's step count, at every shape of the build."""
    requests = []
    for view in views(backend.manifest):
        spec = view.graph_spec
        base = view.contract.example_feed(seed=seed)
        shaped = backend.at(view)
        for steps in spec.dsap.step_ranges(spec.steps):
            if not len(steps):
                continue
            feed = {**base, "step": torch.full((spec.batch,), steps.start, dtype=torch.int32),
                    "num_steps": torch.full((spec.batch,), spec.steps, dtype=torch.int32)}
            shaped.check(feed)
            requests.append((view, steps.start, feed))
    return requests


def compare_local(url: str, build: str | Path, model: str = DEFAULT_MODEL, repeats: int = 20, seed: int = 0) -> dict:
    """Per-call latency of the served UNet beside the same graphs run in this process on onnxruntime.

    Calls alternate (local, served, local, served, …) at concurrency 1 in one run, so both see the same
    machine; every served output must equal the local one bit for bit. The difference is what the
    server adds per call: encoding, transfer, routing, the BLS hop, and the reply. Every (shape, stage) of the
    build takes its turn.
    """
    remote = TritonBackend.connect(url, model)
    local = load_backend("onnxruntime", build)
    if local.manifest.model_dump(exclude={"created"}) != remote.manifest.model_dump(exclude={"created"}):
        raise TritonClientError(f"{url} serves another build than {build} (their manifests differ)")
    calls = []
    for view, step, feed in stage_feeds(remote, seed):
        entry = view.stage_at(step, view.graph_spec.steps)[1]
        calls.append((local.at(view_at(local.manifest, view.shape)), entry.same_as or entry.name, feed))
    times: dict[str, list[float]] = {"local": [], "triton": []}
    identical = True
    for round_ in range(repeats + 1):  # round 0 warms both up and is not timed
        for runner, graph, feed in calls:
            tick = time.perf_counter()
            want = runner.run(graph, feed)
            middle = time.perf_counter()
            got, _ = remote.infer(feed)
            end = time.perf_counter()
            identical &= np.array_equal(got, want.numpy())
            if round_:
                times["local"].append((middle - tick) * 1e3)
                times["triton"].append((end - middle) * 1e3)
    remote.release()
    local_ms, triton_ms = float(np.median(times["local"])), float(np.median(times["triton"]))
    return {"calls": len(times["local"]), "identical": bool(identical), "local_ms": local_ms, "triton_ms": triton_ms,
            "overhead_ms": triton_ms - local_ms, "ratio": triton_ms / local_ms}


def connect_all(urls: Sequence[str], model: str = DEFAULT_MODEL) -> list[TritonBackend]:
    """A backend per server, refused in one line unless every server serves the same build (its manifest): requests
    spread over them must get the same outputs from each."""
    backends: list[TritonBackend] = []
    try:
        for url in urls:
            backends.append(TritonBackend.connect(url, model))
            if backends[-1].manifest != backends[0].manifest:
                raise TritonClientError(f"{url} serves another build than {urls[0]} (their manifests differ); a load "
                                        "test spreads one build's requests over servers of that build")
    except BaseException:
        for backend in backends:
            backend.release()
        raise
    return backends


def load_test(urls: str | Sequence[str], model: str = DEFAULT_MODEL, requests: int = 200, concurrency: int = 16,
              seed: int = 0, progress: Any = None) -> dict:
    """``requests`` UNet calls from ``concurrency`` clients, cycling over every stage of the schedule at every shape
    of the build, the clients spread over the servers at ``urls`` (client ``i`` keeps one connection to server
    ``i mod len(urls)``, as a Service balances connections).

    Each distinct request is first sent once, alone, to the first server: every concurrent output, from any server,
    must equal it exactly. Latency is per request, measured on the client (encode, send, queue, run, receive).
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    backends = connect_all(urls, model)
    first = backends[0]
    spec = first.view.graph_spec
    sent = stage_feeds(first, seed)
    feeds = [feed for _, _, feed in sent]
    reference = [first.infer(feed) for feed in feeds]
    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def one(i: int) -> tuple[float, bool, str | None, int]:
        if not hasattr(local, "client"):
            with lock:
                local.server = len(clients) % len(backends)
                local.client = backends[local.server].module.InferenceServerClient(parse_url(urls[local.server])[1])
                clients.append(local.client)
        backend = backends[local.server]
        start = time.perf_counter()
        try:
            latent, stages = backend.infer(feeds[i % len(feeds)], local.client)
        except TritonClientError as exc:
            return time.perf_counter() - start, False, str(exc), local.server
        seconds = time.perf_counter() - start
        want_latent, want_stages = reference[i % len(feeds)]
        same = np.array_equal(latent, want_latent) and np.array_equal(stages, want_stages)
        if progress:
            progress(i)
        return seconds, same, None, local.server

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    for backend in backends:
        backend.release()
    errors = [e for _, _, e, _ in results if e]
    latencies = [s * 1e3 for s, _, e, _ in results if not e]
    return {
        "url": urls[0], "urls": urls, "model": model, "spec": spec.name, "batch": spec.batch,
        "steps_sent": list(dict.fromkeys(step for _, step, _ in sent)),
        "shapes_sent": list(dict.fromkeys(view.shape.key for view, _, _ in sent)),
        "requests": requests, "concurrency": concurrency, "errors": len(errors), "first_error": errors[0] if errors else None,
        "mismatches": sum(1 for _, same, e, _ in results if not e and not same),
        "per_server": [sum(1 for *_, server in results if server == index) for index in range(len(urls))],
        "wall_seconds": wall, "throughput_rps": requests / wall,
        "p50_ms": _percentile(latencies, 50), "p90_ms": _percentile(latencies, 90), "p99_ms": _percentile(latencies, 99),
        "mean_ms": float(np.mean(latencies)) if latencies else float("nan"), "max_ms": max(latencies, default=float("nan")),
    }
