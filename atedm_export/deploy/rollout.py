"""``atedm-export rollout``: move running Triton servers to a deployment's newest version, then retire the old ones.

Triton's explicit model control and version policies do the work (``config``): a graph model loads every
version, the router only its newest. On each server in turn:

1. load every graph model: the new version comes up beside the one the serving router calls, which is
   untouched (Triton does not reload a version whose files did not change);
2. load the router: Triton brings up its new version, sends new requests to it once it is ready, and unloads the
   old version after the requests in flight finish. Each router version calls the graph models at its own
   version, so no request mixes two builds;
3. wait until the old router version is gone.

Once every server runs the new router, each server unloads the graph models the new build does not use,
``retire_old_versions`` removes the old versions (and those models) from the repository, and each server loads
its graph models again, which unloads their old versions. A request is never refused along the way; each step
waits for the server's repository index to say it is done.

The servers must read the repository this command writes (a local folder, or a volume they share) and run with
explicit model control (``serve`` does; the README says how to start one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..buildfolder import Manifest, parse_manifest
from ..errors import AtedmError, first_line
from .client import client_module, parse_url
from .repository import Progress, check_repository, current_record
from .server import SHELL_CONTROL
from .config import version_manifests
from .serving import MANIFEST_PARAMETER
from .versions import retire_old_versions

READY, UNLOADING, LOADING = "READY", "UNLOADING", "LOADING"
States = dict[int, str]  # a model's versions on a server: version → Triton's state


class RolloutError(AtedmError):
    """A server that cannot be moved: unreachable, not serving this deployment, refusing a load, or too slow."""


@dataclass
class ServerControl:
    """One server's model-control API (HTTP or gRPC), with the one-line errors of this command."""

    url: str
    protocol: str
    client: Any

    @classmethod
    def connect(cls, url: str) -> ServerControl:
        protocol, address = parse_url(url)
        try:
            client = client_module(protocol).InferenceServerClient(address)
        except Exception as exc:  # noqa: BLE001 - what either client library raises for an address it refuses
            raise RolloutError(f"cannot reach Triton at {url}: {first_line(exc)}") from None
        return cls(url, protocol, client)

    def _call(self, what: str, call: Callable[[], Any]) -> Any:  # noqa: ANN401 - the client's own types
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - InferenceServerException, or the connection dropped
            raise RolloutError(f"Triton at {self.url}: {what} failed: {first_line(exc)}") from None

    def index(self) -> dict[str, States]:
        """Every model in the server's repository (loaded or not) with its versions' states (``READY``, ``LOADING``,
        ``UNLOADING``, ``UNAVAILABLE``…)."""
        grpc = {"as_json": True} if self.protocol == "grpc" else {}
        index = self._call("reading the repository index", lambda: self.client.get_model_repository_index(**grpc))
        models: dict[str, States] = {}
        for row in index.get("models", []) if isinstance(index, dict) else index:
            states = models.setdefault(row.get("name", ""), {})
            if str(row.get("version", "")).isdigit():
                states[int(row["version"])] = row.get("state", "")
        return models

    def states(self, model: str) -> States:
        """The versions of ``model`` the server knows, with their states."""
        return self.index().get(model, {})

    def load(self, model: str) -> None:
        try:
            self.client.load_model(model)
        except Exception as exc:  # noqa: BLE001 - as above
            message = first_line(exc)
            hint = (f"; start the server with {SHELL_CONTROL}" if "explicit" in message.lower() or "poll" in
                    message.lower() else "")
            raise RolloutError(f"Triton at {self.url} did not load '{model}': {message}{hint}") from None

    def unload(self, model: str) -> None:
        self._call(f"unloading '{model}'", lambda: self.client.unload_model(model))

    def published(self, router: str) -> Manifest | None:
        """The manifest the server's loaded router publishes; None where it has no ready router of that name."""
        if not self._call(f"asking for '{router}'", lambda: self.client.is_model_ready(router)):
            return None
        grpc = {"as_json": True} if self.protocol == "grpc" else {}
        config = self._call(f"reading '{router}'s config", lambda: self.client.get_model_config(router, **grpc))
        config = config.get("config", config)
        text = config.get("parameters", {}).get(MANIFEST_PARAMETER, {}).get("string_value")
        return parse_manifest(text) if text else None

    def close(self) -> None:
        self.client.close()


def _transient(error: RolloutError) -> bool:
    """A server whose view of the repository lags behind it (a mirror, a synced volume): a model folder not there yet,
    or gone with a link to it still there. Worth asking again; any other error is not."""
    message = str(error).lower()
    return "failed to stat" in message or "not found" in message


def _wait(server: ServerControl, model: str, done: Callable[[States], bool], what: str, deadline: float,
          load: bool = True) -> None:
    """Until ``done(states of model)``: loading the model first (``load``) once the server's repository shows it, and
    again every 2 s while it is not done (a server that sees the repository late sees the change late)."""
    asked, last = float("-inf"), ""
    while True:
        try:
            index = server.index()
            if load and model in index and time.monotonic() - asked >= 2.0:
                server.load(model)
                asked = time.monotonic()
                index = server.index()
            if done(index.get(model, {})):
                return
            shown = ", ".join(f"{v} {s or '?'}" for v, s in sorted(index.get(model, {}).items())) or "none"
            last = f"its versions: {shown}" if model in index else "not in its repository"
        except RolloutError as error:
            if not _transient(error):
                raise
            last = str(error)
        if time.monotonic() > deadline:
            raise RolloutError(f"Triton at {server.url}: '{model}' did not {what} in time ({last}); the repository "
                               "is left with every version: run rollout again, or raise --timeout")
        time.sleep(0.25)


def _only(version: int) -> Callable[[States], bool]:
    """Done when no other version of the model is loaded or still finishing its requests."""
    return lambda states: all(s not in (READY, UNLOADING, LOADING) for v, s in states.items() if v != version)


def _check_server(server: ServerControl, router: str, manifests: dict[int, Manifest]) -> int:
    """The server runs this deployment's router: returns the version whose manifest it publishes."""
    published = server.published(router)
    if published is None:
        raise RolloutError(f"Triton at {server.url} has no ready atedm-export router '{router}'; rollout moves servers "
                           "that serve this repository")
    for version, manifest in manifests.items():
        if manifest == published:
            return version
    raise RolloutError(f"Triton at {server.url} serves a router '{router}' of another build than any version of this "
                       "repository; rollout moves servers that serve this repository")


def _move(server: ServerControl, record: dict, deadline: float, progress: Progress) -> None:
    """Steps 1-3 of the module's notes on one server."""
    newest, router = record["version"], record["router"]
    for model, info in record["models"].items():
        if info["graph"] and newest in info["versions"]:
            _wait(server, model, lambda states: states.get(newest) == READY, f"load version {newest}", deadline)
            progress(server.url, f"{model}: version {newest} ready")
    _wait(server, router, lambda states: states.get(newest) == READY, f"load version {newest}", deadline)
    progress(server.url, f"{router}: version {newest} ready, new requests go to it")
    _wait(server, router, _only(newest), "finish its old version's requests", deadline, load=False)
    progress(server.url, f"{router}: old version unloaded after its requests finished")


def _unload_unused(server: ServerControl, record: dict, deadline: float, progress: Progress) -> None:
    """Unload the graph models the newest version does not use (a stage the new schedule dropped), before their
    folders go."""
    newest = record["version"]
    unused = [model for model, info in record["models"].items() if info["graph"] and newest not in info["versions"]]
    for model in unused:
        if not _only(-1)(server.states(model)):  # still loaded
            server.unload(model)
            _wait(server, model, _only(-1), "unload", deadline, load=False)
            progress(server.url, f"{model}: unloaded (version {newest} does not use it)")


def _unload_old_versions(server: ServerControl, before: dict, after: dict, deadline: float, progress: Progress) -> None:
    """After the repository lost its old versions: each graph model loaded again, which unloads them."""
    newest = after["version"]
    for model, info in after["models"].items():
        if info["graph"] and any(v != newest for v in before["models"][model]["versions"]):
            _wait(server, model, _only(newest), "unload its old versions", deadline)
            progress(server.url, f"{model}: old versions unloaded")


def rollout(repository: Path, urls: Sequence[str], timeout: float = 600.0,
            progress: Progress = lambda where, event: None) -> dict:
    """Move every server at ``urls`` to the deployment's newest version, then retire the old versions from the
    repository and the servers. Returns what was done: per server, the version it served before, and the seconds each
    phase took. Every server is checked before any is touched; ``timeout`` bounds each phase on each server."""
    repository = Path(repository).resolve()
    record = current_record(repository)
    check_repository(repository, files=False)
    router = record["router"]
    manifests = version_manifests(repository, router)
    servers: list[ServerControl] = []
    try:
        for url in urls:
            servers.append(ServerControl.connect(url))
        before = {server.url: _check_server(server, router, manifests) for server in servers}
        report: dict[str, Any] = {"version": record["version"], "servers": []}
        for server in servers:
            start = time.monotonic()
            _move(server, record, start + timeout, progress)
            report["servers"].append({"url": server.url, "from": before[server.url], "to": record["version"],
                                      "switch_s": time.monotonic() - start})
        starts = {server.url: time.monotonic() for server in servers}
        for server in servers:
            _unload_unused(server, record, starts[server.url] + timeout, progress)
        retired = retire_old_versions(repository, progress)
        report["retired"] = sorted(set(record["versions"]) - set(retired["versions"]), key=int)
        for server, row in zip(servers, report["servers"]):
            _unload_old_versions(server, record, retired, time.monotonic() + timeout, progress)
            row["retire_s"] = time.monotonic() - starts[server.url]
        return report
    finally:
        for server in servers:
            server.close()
