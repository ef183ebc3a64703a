"""A new build rolled out to a running ``tritonserver`` under load: no request fails, none mixes two versions.

The two builds differ in their schedule (a graph changed, one dropped, one added), so a request whose rows run in
two stages would come back from two builds if the router of one version called the graph models of the other:
every concurrent output must equal, as a whole and bit for bit, the one the server gave alone before or after.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from atedm_export.buildfolder import first_view, read_manifest
from atedm_export.cli import main
from atedm_export.deploy.client import TritonBackend, TritonClientError
from atedm_export.deploy.config import model_versions
from atedm_export.deploy.repository import DeployRequest, deploy
from atedm_export.deploy.rollout import RolloutError, ServerControl, rollout
from atedm_export.deploy.server import TritonServer
from atedm_export.deploy.versions import next_version

from .conftest import small_spec
from .test_triton_server import install  # noqa: F401 - a fixture

STEPS = 10
OLD = {"stages": [{"name": "early", "until": 0.5, "keep": 0.9}, {"name": "main", "until": 1.0, "keep": 0.37}]}
NEW = {"stages": [{"name": "early", "until": 0.5, "keep": 0.7}, {"name": "late", "until": 1.0, "keep": 0.5}]}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two builds of tiny-sd15 at 128 px that differ only in their schedule."""
    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    folder = tmp_path_factory.mktemp("rollout")
    out = {}
    for name, schedule in (("old", OLD), ("new", NEW)):
        (folder / name).mkdir()
        spec = small_spec(folder / name, height=128, width=128, steps=STEPS, schedule=schedule)
        build(BuildRequest(load_spec(spec), folder / name / "build", library="onnx"))
        out[name] = folder / name / "build"
    return out


def _two_stage_requests(build) -> list[dict[str, torch.Tensor]]:  # noqa: ANN001 - a path
    """Requests whose first row is at step 0 (early) and second at the last step (main, or late): two graph calls."""
    requests = []
    for seed in (1, 2):
        feed = first_view(read_manifest(build)).contract.example_feed(seed=seed)
        requests.append({**feed, "step": torch.tensor([0, STEPS - 1], dtype=torch.int32),
                         "num_steps": torch.full((2,), STEPS, dtype=torch.int32)})
    return requests


@pytest.mark.slow  # two builds (~1 min) and a server taken through a rollout under load (~1 min)
def test_a_new_schedule_rolls_out_under_load_without_a_failed_or_mixed_request(install, builds, tmp_path):
    repo = tmp_path / "repo"
    deploy(DeployRequest(builds["old"], repo, variant="onnxruntime"))
    requests = _two_stage_requests(builds["old"])
    with TritonServer(repo, install=install) as server:
        backend = TritonBackend.connect(server.http_url)
        old = [backend.infer(r)[0] for r in requests]
        answers: list[tuple[int, np.ndarray]] = []
        failures: list[str] = []
        done = threading.Event()

        def client(index: int) -> None:
            mine = TritonBackend.connect(server.http_url)
            i = index
            while not done.is_set() or len(answers) + len(failures) < 200:
                try:
                    answers.append((i % 2, mine.infer(requests[i % 2])[0]))
                except TritonClientError as exc:
                    failures.append(str(exc))
                i += 1
            mine.release()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        while len(answers) + len(failures) < 20:
            time.sleep(0.05)
        start = time.monotonic()
        next_version(DeployRequest(builds["new"], repo, variant="onnxruntime"))
        report = rollout(repo, [server.http_url], timeout=300)
        seconds = time.monotonic() - start
        done.set()
        for thread in threads:
            thread.join()
        new = [backend.infer(r)[0] for r in requests]
        control = ServerControl.connect(server.http_url)
        states = {m: control.states(m) for m in ("atedm_unet", "atedm_unet_early", "atedm_unet_main", "atedm_unet_late")}
        control.close()
        backend.release()
        log = server.log()

    for a, b in zip(old, new):  # the versions differ in each row, so a mixed answer would show
        assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])
    mixed = [i for i, got in answers if not (np.array_equal(got, old[i]) or np.array_equal(got, new[i]))]
    from_old = sum(np.array_equal(got, old[i]) for i, got in answers)
    print(f"rollout under load: {len(answers) + len(failures)} requests from 4 clients, {len(failures)} failed, "
          f"{len(mixed)} mixed, {from_old} answered by version 1 and {len(answers) - from_old} by version 2; "
          f"next version written and rolled out in {seconds:.1f}s (switch {report['servers'][0]['switch_s']:.1f}s, "
          f"retire {report['servers'][0]['retire_s']:.1f}s)")
    assert failures == [] and mixed == []
    assert len(answers) >= 200 and 0 < from_old < len(answers)  # both versions answered: the load spanned the switch
    assert report["version"] == 2 and report["retired"] == ["1"] and report["servers"][0]["from"] == 1
    assert states["atedm_unet"].get(2) == "READY" and states["atedm_unet"].get(1) != "READY"
    assert states["atedm_unet_early"].get(2) == "READY" and states["atedm_unet_early"].get(1) != "READY"
    assert states["atedm_unet_late"] == {2: "READY"}
    assert "READY" not in states["atedm_unet_main"].values()
    assert model_versions(repo / "atedm_unet_early") == [2] and not (repo / "atedm_unet_main").exists()
    # the serving version was never loaded again while the new one came up beside it: one instance made for each
    # version (Triton logs "loading" for a version it keeps as it is, and makes no instance for it)
    assert log.count("TRITONBACKEND_ModelInstanceInitialize: atedm_unet_early_0_0") == 2, log
    assert log.count("successfully unloaded 'atedm_unet_early' version 1") == 1, log


def test_rollout_refuses_a_server_of_another_deployment_before_touching_any(install, tiny_tome_build, refitted,
                                                                            ort_repo, tmp_path):
    repo = tmp_path / "repo"
    deploy(DeployRequest(tiny_tome_build, repo, variant="onnxruntime"))
    next_version(DeployRequest(refitted[0], repo, variant="onnxruntime"))
    with TritonServer(ort_repo, install=install) as other:
        with pytest.raises(RolloutError, match="serves a router 'atedm_unet' of another build than any version"):
            rollout(repo, [other.http_url], timeout=30)
        control = ServerControl.connect(other.http_url)
        assert control.states("atedm_unet") == {1: "READY"}
        control.close()
    assert model_versions(repo / "atedm_unet") == [1, 2]  # nothing retired
    result = CliRunner().invoke(main, ["rollout", str(repo), "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "Triton at http://127.0.0.1:1" in result.output, result.output
    assert "Traceback" not in result.output
