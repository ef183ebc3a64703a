"""A real ``tritonserver`` (nvidia-pytriton's, on this CPU) serving the tiny build's onnxruntime repository.

Outputs are compared with the local ``StagedUNet`` on the same backend bit for bit. The server listens on
loopback only and is stopped at the end of the module, also when a test fails. Where no server binary
is installed the module skips, unless ATEDM_REQUIRE_TRITON=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.deploy.client import TritonBackend, TritonClientError, compare_local, connect, load_test
from atedm_export.deploy.repository import DeployRequest, deploy
from atedm_export.deploy.server import TritonServer, TritonServerError, find_server, free_port
from atedm_export.buildfolder import first_view, read_manifest, view_at
from atedm_export.runtime import StagedUNet, load_backend

from .test_deploy import MULTI_KEYS, foreign_model, multi_repo, snapshot  # noqa: F401 - multi_repo: a fixture
from .test_runtime import _denoise


@pytest.fixture(scope="module")
def install():
    try:
        return find_server()
    except TritonServerError as exc:
        if os.environ.get("ATEDM_REQUIRE_TRITON") == "1":
            pytest.fail(f"ATEDM_REQUIRE_TRITON=1 but {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def server(install, ort_repo):
    with TritonServer(ort_repo, install=install) as running:
        yield running
    assert running.process is None and running.returncode is not None


@pytest.fixture(scope="module")
def local(tiny_build):
    return load_backend("onnxruntime", tiny_build)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_unet_equals_the_local_staged_unet_bit_for_bit(server, tiny_build, protocol):
    served = connect(server.http_url if protocol == "http" else server.grpc_url)
    local = StagedUNet.load(tiny_build, backend="onnxruntime")
    assert served.manifest == local.manifest
    got, want = _denoise(served, 20), _denoise(local, 20)
    assert torch.equal(got, want)
    assert served.stage_report()[0]["calls"] == 2 and served.stage_report()[1]["calls"] == 18
    assert [r["steps"] for r in served.stage_report()] == [r["steps"] for r in local.stage_report()] == ["0-1", "2-19"]


def _rows(feed: dict[str, torch.Tensor], rows: list[int], steps: list[int], num_steps: int) -> dict[str, torch.Tensor]:
    picked = {name: value[rows] for name, value in feed.items()}
    return {**picked, "step": torch.tensor(steps, dtype=torch.int32),
            "num_steps": torch.full((len(rows),), num_steps, dtype=torch.int32)}


def test_partial_and_mixed_stage_batches_are_padded_per_graph(server, local, feed):
    backend = TritonBackend.connect(server.http_url)
    # one row at step 0 (early): padded to the static batch of 2 by repeating the row
    latent, stages = backend.infer(_rows(feed, [1], [0], 20))
    want = local.run("early", {n: v[[1, 1]] for n, v in feed.items()})[:1]
    assert stages.tolist() == [0] and np.array_equal(latent, want.numpy())
    # a pair whose rows are in different stages: each row runs in its own stage's graph
    latent, stages = backend.infer(_rows(feed, [0, 1], [1, 7], 20))
    assert stages.tolist() == [0, 1]
    assert np.array_equal(latent[0], local.run("early", {n: v[[0, 0]] for n, v in feed.items()})[0].numpy())
    assert np.array_equal(latent[1], local.run("main", {n: v[[1, 1]] for n, v in feed.items()})[0].numpy())


@pytest.fixture(scope="module")
def feed(tiny_build):
    manifest = read_manifest(tiny_build, verify=False)
    return first_view(manifest).contract.example_feed(seed=3)


def test_a_step_outside_the_run_is_a_clear_error_and_the_server_keeps_serving(server, feed):
    backend = TritonBackend.connect(server.grpc_url)
    with pytest.raises(TritonClientError, match="step 20 is outside a run of 20 steps"):
        backend.infer(_rows(feed, [0, 1], [20, 20], 20))
    _, stages = backend.infer(_rows(feed, [0, 1], [19, 19], 20))
    assert stages.tolist() == [1, 1]
    with pytest.raises(TritonClientError, match="has no ready model 'unet'"):
        TritonBackend.connect(server.http_url, model="unet")


def _http_infer(server: TritonServer, feed: dict[str, torch.Tensor]) -> tuple[int, str]:
    """One call of the router over Triton's plain HTTP/JSON protocol: (HTTP status, body), as any client sees it."""
    inputs = []
    for name, tensor in feed.items():
        array = tensor.numpy()
        array = array.reshape(-1, 1) if array.ndim == 1 else array
        inputs.append({"name": name, "shape": list(array.shape), "data": array.ravel().tolist(),
                       "datatype": "INT32" if array.dtype == np.int32 else "FP32"})
    request = urllib.request.Request(f"{server.http_url}/v2/models/atedm_unet/infer", json.dumps({"inputs": inputs}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_bad_request_is_the_clients_error_http_400_with_one_line(server, feed):
    """A step outside the run, a run of 0 steps, a NaN or infinite latent: the caller's mistake (400), not the
    server's (500); a NaN latent is refused, not served as a NaN output."""
    nan, inf = feed["sample"].clone(), feed["sample"].clone()
    nan[0, 0, 0, 0], inf[1, 2, 3, 4] = float("nan"), float("inf")
    for request, message in (
        (_rows(feed, [0, 1], [20, 20], 20), "step 20 is outside a run of 20 steps"),
        (_rows(feed, [0, 1], [0, 0], 0), "step 0 is outside a run of 0 steps"),
        ({**_rows(feed, [0, 1], [3, 3], 20), "sample": nan}, "input 'sample' holds NaN or infinite values"),
        ({**_rows(feed, [0, 1], [0, 0], 20), "sample": inf}, "input 'sample' holds NaN or infinite values"),
    ):
        status, body = _http_infer(server, request)
        error = json.loads(body)["error"]
        assert status == 400 and message in error and "\n" not in error, (status, body)
    assert _http_infer(server, _rows(feed, [0, 1], [3, 3], 20))[0] == 200  # and it goes on serving


def test_generate_through_triton_writes_the_same_png_as_local(server, tiny_build, tmp_path):
    remote, here = tmp_path / "remote.png", tmp_path / "local.png"
    for args, path in (([f"--triton={server.grpc_url}"], remote), ([str(tiny_build)], here)):
        result = CliRunner().invoke(main, ["generate", *args, "-p", "a red fox", "--steps", "6", "-o", str(path)])
        assert result.exit_code == 0, result.output
    assert "Triton (grpc://127.0.0.1:" in CliRunner().invoke(
        main, ["generate", f"--triton={server.grpc_url}", "-p", "x", "--steps", "2", "-o", str(tmp_path / "x.png")]).output
    assert remote.read_bytes() == here.read_bytes()
    result = CliRunner().invoke(main, ["generate", str(tiny_build), "--triton", server.http_url, "-p", "x", "-o", str(remote)])
    assert result.exit_code == 2 and "either BUILD_DIR" in result.output


@pytest.mark.slow  # a second server (~15 s to start) and two 200-request load tests
def test_two_servers_of_one_repository_share_the_load_and_answer_alike(server, install, ort_repo, tmp_path, capsys):
    """Scale-out as a Service does it: two servers of one repository, the clients spread over both. Every output
    from either equals the first server's alone; the throughput of two against one is reported (2 cores here: the
    servers share them, so the ratio says what the client side and the BLS hop cost, not what a second GPU gives)."""
    with TritonServer(ort_repo, install=install) as second:
        one = load_test([server.http_url], requests=200, concurrency=16)
        both = load_test([server.http_url, second.grpc_url], requests=200, concurrency=16)
    for report in (one, both):
        assert report["errors"] == 0 and report["mismatches"] == 0, report["first_error"]
    assert sum(both["per_server"]) == 200 and min(both["per_server"]) > 0 and one["per_server"] == [200]
    with capsys.disabled():
        print(f"\n[two servers] 200 requests, 16 clients: 1 server {one['throughput_rps']:.1f} requests/s, 2 servers "
              f"{both['throughput_rps']:.1f} ({both['per_server'][0]} / {both['per_server'][1]}): "
              f"{both['throughput_rps'] / one['throughput_rps']:.2f}x; 0 errors, 0 mismatches")


@pytest.mark.slow  # a second server of another build (~20 s)
def test_servers_of_other_builds_are_refused_together(server, install, tiny_tome_build, tmp_path):
    from atedm_export.deploy.repository import DeployRequest, deploy

    other = tmp_path / "other"
    deploy(DeployRequest(tiny_tome_build, other, variant="onnxruntime"))
    with TritonServer(other, install=install) as second:
        with pytest.raises(TritonClientError, match=f"{second.http_url} serves another build than {server.http_url}"):
            load_test([server.http_url, second.http_url], requests=2, concurrency=1)


@pytest.mark.slow
def test_load_test_200_requests_from_16_clients(server, tiny_build, tmp_path, capsys):
    report_path = tmp_path / "load.json"
    result = CliRunner().invoke(main, ["load-test", server.http_url, "--requests", "200", "--concurrency", "16",
                                       "--compare", str(tiny_build), "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["requests"] == 200 and report["concurrency"] == 16
    assert report["errors"] == 0 and report["mismatches"] == 0
    assert report["steps_sent"] == [0, 2]  # the first step of each stage: both graphs under load
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    compare = report["compare"]
    assert compare["identical"] and compare["calls"] == 40
    assert compare["overhead_ms"] == pytest.approx(compare["triton_ms"] - compare["local_ms"])
    with capsys.disabled():
        print(f"\n[triton load test] 200 requests, 16 clients, batch {report['batch']}: 0 errors, 0 mismatches, "
              f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, {report['throughput_rps']:.1f} requests/s; "
              f"served {compare['triton_ms']:.1f} ms vs in-process {compare['local_ms']:.1f} ms per call")


def _stage_processes(model: str) -> list[int]:
    """Process ids of the Python-backend stubs that serve ``model`` (one per instance)."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in table.splitlines()
            if "triton_python_backend_stub" in line and f"/{model}/" in line]


def test_a_killed_stage_model_comes_back_and_no_request_fails(server, feed, capsys):
    """SIGKILL the 'main' stage model's process under load (what an out-of-memory kill does): the router
    reloads it and retries, so requests wait instead of failing, and requests to 'early' never notice."""
    import threading
    import time

    import tritonclient.grpc as grpcclient

    backend = TritonBackend.connect(server.grpc_url)
    requests = {stage: {**feed, "step": torch.full((2,), step, dtype=torch.int32),
                        "num_steps": torch.full((2,), 20, dtype=torch.int32)} for stage, step in (("early", 0), ("main", 2))}
    victims = _stage_processes("atedm_unet_main")
    assert victims, "no stub process found for atedm_unet_main"
    calls: list[tuple[str, float, float, str]] = []
    stop = threading.Event()

    def client(stage: str) -> None:
        connection = grpcclient.InferenceServerClient(server.grpc_url.split("://")[1])
        while not stop.is_set():
            start = time.perf_counter()
            try:
                backend.infer(requests[stage], connection)
                error = ""
            except TritonClientError as exc:
                error = str(exc)
            calls.append((stage, start, time.perf_counter(), error))

    threads = [threading.Thread(target=client, args=(stage,)) for stage in ("early", "main", "main", "early")]
    for thread in threads:
        thread.start()
    time.sleep(2)
    killed = time.perf_counter()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    deadline = killed + 60
    while time.perf_counter() < deadline and not any(
            stage == "main" and start > killed and not error for stage, start, _, error in calls):
        time.sleep(0.2)
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(60)
    after = [c for c in calls if c[2] > killed]
    failed = [c for c in after if c[3]]
    back = min(end for stage, start, end, error in after if stage == "main" and start > killed and not error) - killed
    assert not [c for c in failed if c[0] == "early"], failed
    assert len(failed) <= 2, failed  # at most the 'main' calls that were inside the killed process
    assert back < 30
    assert _stage_processes("atedm_unet_main") and set(_stage_processes("atedm_unet_main")).isdisjoint(victims)
    assert backend.client.is_model_ready("atedm_unet_main")
    with capsys.disabled():
        print(f"\n[triton kill test] 'main' stage process killed under load: {len(after)} calls completed after the "
              f"kill, {len(failed)} failed; 'main' answered again {back:.1f} s after the kill")


@pytest.mark.slow
def test_a_repository_that_fails_to_load_stops_the_server_and_says_why(install, ort_repo, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(ort_repo, repo)
    graph = repo / "atedm_unet" / "1" / "build" / "onnx" / "main.onnx"
    graph.write_bytes(graph.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the server's backends folder and log go
    server = TritonServer(repo, install=install)
    with pytest.raises(TritonServerError, match="failed to load 'atedm_unet_main' .* main: .*main.onnx does not match its checksum"):
        server.start()
    assert server.process is None and server.returncode is not None
    assert "successfully unloaded 'atedm_unet'" in server.log()  # the models that did load were unloaded
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


@pytest.mark.slow
def test_serve_keeps_the_servers_log_and_shows_its_last_lines_when_it_fails(install, ort_repo, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(ort_repo, repo)
    graph = repo / "atedm_unet" / "1" / "build" / "onnx" / "main.onnx"
    graph.write_bytes(graph.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setenv("ATEDM_TRITONSERVER", str(install.binary))  # the server the fixture found
    log = tmp_path / "server.log"
    result = CliRunner().invoke(main, ["serve", str(repo), "--http-port", str(free_port()), "--grpc-port",
                                       str(free_port()), "--log", str(log), "--timeout", "120"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "main.onnx does not match its checksum" in errors[0]
    assert "lines of the server's log" in result.output and "Traceback" not in result.output
    assert log.is_file() and "failed to load 'atedm_unet_main'" in log.read_text()


def test_serve_runs_until_sigterm_then_stops_the_server_and_leaves_the_repository_as_it_was(install, tiny_build,
                                                                                           feed, tmp_path):
    """A shared repository (another team's Python model beside ours), served, called, stopped: every file and
    folder as deploy left it; no ``__pycache__`` from the Python backend importing each ``model.py``."""
    repo = tmp_path / "shared"
    foreign_model(repo)
    deploy(DeployRequest(tiny_build, repo, variant="onnxruntime"))
    before = snapshot(tmp_path)
    http, grpc = free_port(), free_port()
    command = [str(Path(sys.executable).parent / "atedm-export"), "serve", str(repo),
               "--http-port", str(http), "--grpc-port", str(grpc)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = process.stdout.readline()
        assert "ready in" in ready and f"http://127.0.0.1:{http}" in ready, ready
        backend = TritonBackend.connect(f"grpc://127.0.0.1:{grpc}")
        _, stages = backend.infer({**feed, "step": torch.tensor([0, 0], dtype=torch.int32),
                                   "num_steps": torch.tensor([1, 1], dtype=torch.int32)})
        assert stages.tolist() == [1, 1]
        assert backend.client.is_model_ready("other_model")  # served beside ours
        backend.release()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 143  # 128 + SIGTERM, as every other command exits
    finally:
        process.kill()
        process.wait()
    with pytest.raises(TritonClientError, match="cannot reach Triton"):
        TritonBackend.connect(f"http://127.0.0.1:{http}")
    assert snapshot(tmp_path) == before



@pytest.mark.slow  # the 3-shape build and a 7-model server: ~2 minutes
def test_one_router_serves_every_shape_of_a_multi_shape_build(install, multi_repo, tiny_multi_build, tmp_path):
    """The three-shape build's repository on a real server: calls at two shapes through the one router equal the
    onnxruntime backend's on the same inputs, call by call; a row short of a batch is padded within its shape;
    a size the build lacks is one line (400); generate --triton --width draws what the local build draws."""
    from diffusers import EulerDiscreteScheduler

    from atedm_export.runtime.pipeline import SDXL_SCHEDULER
    from atedm_export.shapes import Shape

    from .conftest import sample_loop

    local = StagedUNet.load(tiny_multi_build, backend="onnxruntime")
    wide, square = Shape(batch=2, height=128, width=192), Shape(batch=2, height=128, width=128)
    with TritonServer(multi_repo, install=install) as server:
        served = connect(server.grpc_url)
        assert served.manifest == local.manifest and [s.key for s in served.manifest.shape_list] == MULTI_KEYS
        calls = []

        def recorded(sample, t, encoder_hidden_states, added_cond_kwargs=None):  # noqa: ANN001, ANN202
            out = served(sample, t, encoder_hidden_states).sample
            calls.append((sample.clone(), t, encoder_hidden_states, out))
            return SimpleNamespace(sample=out)

        recorded.set_timesteps = served.set_timesteps
        for shape in (wide, square):
            sample_loop(recorded, EulerDiscreteScheduler(**SDXL_SCHEDULER), view_at(local.manifest, shape).contract, 3)
        assert [list(c[0].shape) for c in calls] == [[2, 4, 16, 24]] * 3 + [[2, 4, 16, 16]] * 3
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
        scheduler.set_timesteps(3)
        local.set_timesteps(scheduler.timesteps)
        for sample, t, text, out in calls:
            assert torch.equal(out, local(sample, t, text).sample)
        assert served.stats["main"].calls == 6

        backend = TritonBackend.connect(server.http_url)
        feed = view_at(local.manifest, wide).contract.example_feed(seed=4)
        latent, stages = backend.infer(_rows(feed, [1], [2], 4))  # one row: the 192x128 batch-2 graph, padded
        want = local.backend.at(view_at(local.manifest, wide)).run("main", {n: v[[1, 1]] for n, v in feed.items()})[:1]
        assert stages.tolist() == [0] and np.array_equal(latent, want.numpy())
        missing = {**_rows(feed, [0, 1], [0, 0], 4), "sample": torch.zeros(2, 4, 16, 20)}
        status, body = _http_infer(server, missing)
        error = json.loads(body)["error"]
        assert status == 400 and "\n" not in error
        assert ("no graphs for batch 2 at 160x128 px (latent 20x16); this build has: 128x128-b2, 192x128-b2, "
                "128x128-b4") in error, error

        report = load_test(server.grpc_url, requests=6, concurrency=2)  # every (shape, stage) under load
        assert report["shapes_sent"] == MULTI_KEYS and report["errors"] == report["mismatches"] == 0
        assert compare_local(server.http_url, tiny_multi_build, repeats=1)["identical"]

        remote, here = tmp_path / "remote.png", tmp_path / "local.png"
        for args, path in (([f"--triton={server.grpc_url}"], remote), ([str(tiny_multi_build)], here)):
            result = CliRunner().invoke(main, ["generate", *args, "-p", "a red fox", "--steps", "2", "--width", "192",
                                               "-o", str(path)])
            assert result.exit_code == 0, result.output
        assert remote.read_bytes() == here.read_bytes()


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_serve_on_a_taken_port_is_refused_before_the_server_starts_and_leaves_nothing(install, ort_repo, which):
    """A taken port is found before ``tritonserver`` runs: a server that finds it itself exits leaving its Python
    backend's ``/tmp/python_env_*`` folder (a fixed path no name ties to it) and shared-memory regions behind."""
    import socket

    def leftovers() -> set[str]:
        return ({p.name for p in Path("/dev/shm").glob("*triton_python_backend_shm_region*")}
                | {p.name for p in Path("/dev/shm").glob("atedm_*")} | {p.name for p in Path("/tmp").glob("python_env_*")})

    repo, before, files = ort_repo, leftovers(), snapshot(ort_repo)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"http": port, "grpc": free_port()} if which == "http" else {"http": free_port(), "grpc": port}
        command = [str(Path(sys.executable).parent / "atedm-export"), "serve", str(repo), "--http-port",
                   str(ports["http"]), "--grpc-port", str(ports["grpc"])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    errors = [line for line in done.stdout.splitlines() + done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout + done.stderr
    assert f"port 127.0.0.1:{port} cannot be used" in errors[0] and f"--{which}-port" in errors[0]
    assert "Traceback" not in done.stderr and "starting tritonserver" not in done.stdout
    assert leftovers() <= before and snapshot(repo) == files
