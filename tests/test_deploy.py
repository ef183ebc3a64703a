"""`atedm-export deploy`: routing, the repository it writes, and the configs' checks (no server needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from atedm_export.cli import main
from atedm_export.errors import AtedmError
from atedm_export.deploy import placement
from atedm_export.deploy.client import TritonClientError, parse_url
from atedm_export.deploy.config import CONFIG, DeployError, check_model, parse, read_repository
from atedm_export.deploy.repository import DeployRequest, check_repository, deploy
from atedm_export.deploy.routing import Router, RoutingError
from atedm_export.deploy.serving import RequestError, _PythonModel, check_finite
from atedm_export.buildfolder import ManifestError, ShapeError, first_view, read_manifest, sha256, views

from .conftest import corrupted_copy, needs_rtx, with_fake_engines


def _feed(batch: int, rows: int, marker: float) -> dict[str, torch.Tensor]:
    """Graph-shaped inputs whose every row is tagged by value: row r of this feed is marker + r."""
    tag = marker + torch.arange(rows, dtype=torch.float32)
    return {
        "sample": tag.reshape(rows, 1, 1, 1).expand(rows, 4, 2, 2).clone(),
        "timestep": tag.clone(),
        "encoder_hidden_states": tag.reshape(rows, 1, 1).expand(rows, 3, 2).clone(),
        "text_embeds": tag.reshape(rows, 1).expand(rows, 5).clone(),
        "time_ids": tag.reshape(rows, 1).expand(rows, 6).clone(),
    }


# --- routing -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router(tiny_build):
    return Router(read_manifest(tiny_build, verify=False))


def test_routes_follow_the_schedule(router):
    assert router.batch == 2
    assert [router.route(s, 20) for s in (0, 1, 2, 19)] == [(0, "early"), (0, "early"), (1, "main"), (1, "main")]
    assert router.route(0, 4) == (1, "main")  # round(0.1 × 4) = 0: the early stage is empty in a 4-step run
    for step, steps in ((20, 20), (-1, 20), (0, 0)):
        with pytest.raises(RoutingError, match=f"step {step} is outside a run of {steps} steps"):
            router.route(step, steps)


def test_a_whole_request_passes_through_untouched(router):
    feeds = [_feed(2, 2, 10.0)]
    (chunk,) = router.plan([["main", "main"]])
    assert chunk.graph == "main" and chunk.rows == ((0, 0), (0, 1))
    gathered = router.gather(chunk, feeds)
    assert all(gathered[n] is feeds[0][n] for n in gathered)


def test_rows_are_grouped_by_graph_chunked_padded_and_scattered_back(router):
    # three requests: a mixed one, a single row, a whole pair; 'early' rows total 3 → two calls
    stages = [["early", "main"], ["early"], ["early", "main"]]
    feeds = [_feed(2, 2, 10.0), _feed(2, 1, 20.0), _feed(2, 2, 30.0)]
    chunks = router.plan(stages)
    assert [(c.graph, c.rows) for c in chunks] == [
        ("early", ((0, 0), (1, 0))), ("early", ((2, 0),)), ("main", ((0, 1), (2, 1))),
    ]
    padded = router.gather(chunks[1], feeds)
    assert padded["sample"].shape == (2, 4, 2, 2)
    assert padded["timestep"].tolist() == [30.0, 30.0]  # the last real row repeated
    outputs = [torch.zeros(len(s), 4, 2, 2) for s in stages]
    for chunk in chunks:
        router.scatter(chunk, router.gather(chunk, feeds)["sample"] * -1, outputs)
    for feed, out in zip(feeds, outputs):
        assert torch.equal(out, -feed["sample"])


# --- the repository ------------------------------------------------------------------------------


def test_onnxruntime_repository_layout_and_configs(ort_repo, tiny_build):
    manifest = read_manifest(tiny_build)
    configs = read_repository(ort_repo)
    assert sorted(configs) == ["atedm_unet", "atedm_unet_baseline", "atedm_unet_early", "atedm_unet_main"]
    assert check_repository(ort_repo) == manifest
    router = configs["atedm_unet"]
    assert router.backend == "python" and router.max_batch_size == 2
    assert router.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(i.name, list(i.dims)) for i in router.input] == [
        ("sample", [4, 32, 32]), ("timestep", [1]), ("encoder_hidden_states", [77, 64]), ("text_embeds", [32]),
        ("time_ids", [6]), ("step", [1]), ("num_steps", [1]),
    ]
    assert [o.name for o in router.output] == ["latent", "stage"]
    assert router.version_policy.latest.num_versions == 1  # only the newest router version serves
    assert read_manifest(ort_repo / "atedm_unet" / "1" / "build") == manifest  # what version 1 routes by
    for graph in ("baseline", "early", "main"):
        config = configs[f"atedm_unet_{graph}"]
        assert config.backend == "python" and config.max_batch_size == 0
        assert config.version_policy.HasField("all")  # a new version loads beside the serving one
        assert config.parameters["atedm_graph"].string_value == graph
        assert [(i.name, list(i.dims)) for i in config.input] == [(t.name, t.shape) for t in first_view(manifest).inputs]
        assert config.parameters["atedm_build"].string_value == "atedm_unet/{version}/build"
        entry = first_view(manifest).graph(graph)
        copied = ort_repo / "atedm_unet" / "1" / "build" / entry.onnx.path
        assert sha256(copied) == entry.onnx.sha256
        assert sorted(p.name for p in (ort_repo / f"atedm_unet_{graph}" / "1").iterdir()) == ["__pycache__", "model.py"]
        assert (ort_repo / f"atedm_unet_{graph}" / "1" / "__pycache__").is_file()  # Python cannot write its cache there
    # one copy of the weights in the repository, shared by every graph model
    weights = list(ort_repo.rglob("*.onnx.data"))
    assert weights == [ort_repo / "atedm_unet" / "1" / "build" / manifest.weights.path]
    record = json.loads((ort_repo / "atedm-deploy.json").read_text())
    assert record["variant"] == "onnxruntime" and record["max_batch"] == 2
    assert record["version"] == 1 and list(record["versions"]) == ["1"]
    assert record["versions"]["1"]["manifest_sha256"] == record["manifest_sha256"]
    readme = (ort_repo / "README.md").read_text()
    assert "atedm-export serve" in readme and "`step` (in) | INT32 | `[b, 1]`" in readme


@pytest.mark.slow
def test_a_stage_that_prunes_nothing_is_routed_to_the_baseline(tmp_path):
    import yaml

    from atedm_export.build import BuildRequest, build
    from atedm_export.spec import load_spec

    from .conftest import small_spec

    spec = small_spec(tmp_path, schedule={"stages": [{"name": "warm", "until": 0.5, "keep": 1.0},
                                                      {"name": "late", "until": 1.0, "keep": 0.37}]})
    assert yaml.safe_load(Path(spec).read_text())["schedule"]["stages"][0]["keep"] == 1.0
    out = tmp_path / "b"
    build(BuildRequest(load_spec(spec), out, library="onnx"))
    record = deploy(DeployRequest(out, tmp_path / "repo", variant="onnxruntime"))
    assert record["models"]["atedm_unet"]["routes"] == {"baseline": "atedm_unet_baseline", "late": "atedm_unet_late"}
    assert not (tmp_path / "repo" / "atedm_unet_warm").exists()
    assert Router(read_manifest(out)).graph_of("warm") == "baseline"


@pytest.fixture(scope="module")
def tensorrt_build(tiny_engine_build, tmp_path_factory):
    """The tiny build as a TensorRT build would record it (the machine has no TensorRT to build one).

    Only the manifest's engine record changes; the plans are TensorRT-RTX's, which is all a config
    check needs: deploy copies plans, it does not parse them.
    """
    copy = tmp_path_factory.mktemp("trt") / "build"
    shutil.copytree(tiny_engine_build, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["engine"].update(library="tensorrt", module="tensorrt", version="10.13.0", targets=[])
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.slow
@needs_rtx
def test_tensorrt_repository_configs_pass_validation(tensorrt_build, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["deploy", str(tensorrt_build), "--triton", str(repo), "--instances", "2",
                                       "--max-batch", "4"])
    assert result.exit_code == 0, result.output
    assert "variant: tensorrt" in result.output
    manifest = check_repository(repo)
    configs = read_repository(repo)
    for graph in ("baseline", "early", "main"):
        config = configs[f"atedm_unet_{graph}"]
        assert config.platform == "tensorrt_plan" and not config.backend and config.max_batch_size == 0
        assert config.default_model_filename == "model.plan"
        assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group] == [("KIND_GPU", 2)]
        assert [(o.name, list(o.dims), pb.DataType.Name(o.data_type)) for o in config.output] == [
            ("latent", [2, 4, 32, 32], "TYPE_FP32")]
        plan = repo / f"atedm_unet_{graph}" / "1" / "model.plan"
        assert sha256(plan) == first_view(manifest).graph(graph).engine.sha256
    assert configs["atedm_unet"].max_batch_size == 4
    assert "nvcr.io/nvidia/tritonserver" in (repo / "README.md").read_text()


@pytest.mark.slow
@needs_rtx
def test_tensorrt_rtx_plans_are_refused_for_triton(tiny_engine_build, tmp_path):
    result = CliRunner().invoke(main, ["deploy", str(tiny_engine_build), "--triton", str(tmp_path / "r"), "--backend", "tensorrt"])
    assert result.exit_code == 2
    assert "has tensorrt-rtx engines; Triton's tensorrt_plan backend loads TensorRT plans only" in result.output
    assert list(tmp_path.iterdir()) == []


def test_bad_requests_fail_with_one_line_and_leave_nothing(tiny_build, tmp_path):
    def run(*args: str):
        return CliRunner().invoke(main, ["deploy", str(tiny_build), "--triton", str(tmp_path / "r"), *args])

    result = run("--name", "unet/1")
    assert result.exit_code == 2 and "model name 'unet/1' must be letters, digits" in result.output
    result = run("--instances", "0")
    assert result.exit_code == 2 and "--instances" in result.output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "r").mkdir()  # an empty folder: nothing in it to replace, so no --force needed
    assert run("--backend", "onnxruntime").exit_code == 0
    before = snapshot(tmp_path)
    result = run("--backend", "onnxruntime", "--name", "other")
    assert result.exit_code == 2 and "already holds an atedm-export deployment (router 'atedm_unet'); pass --force" in result.output
    result = CliRunner().invoke(main, ["deploy", str(tmp_path / "nothing"), "--triton", str(tmp_path / "s")])
    assert result.exit_code == 2 and "is not a build folder" in result.output
    assert snapshot(tmp_path) == before


# --- what deploy may write, replace and never touch -----------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too): a file's sha256, else what it is. Equal snapshots mean
    the folder was left exactly as it was."""
    def state(path: Path) -> str:
        if path.is_symlink():
            return f"link to {os.readlink(path)}"
        return sha256(path) if path.is_file() else "folder"

    return {str(p.relative_to(folder)): state(p) for p in sorted(folder.rglob("*"))}


FOREIGN_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:  # another team's model: y = x
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack(
            "y", pb_utils.get_input_tensor_by_name(r, "x").to_dlpack())]) for r in requests]
"""


def foreign_model(repository: Path, name: str = "other_model") -> Path:
    """Another team's model in a shared repository (a Python model a server loads), with known bytes."""
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / CONFIG).write_text(f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
                                 'input { name: "x" data_type: TYPE_FP32 dims: 1 }\n'
                                 'output { name: "y" data_type: TYPE_FP32 dims: 1 }\n'
                                 'instance_group { kind: KIND_CPU count: 1 }\n')
    (folder / "1" / "model.py").write_text(FOREIGN_MODEL)
    return folder


@pytest.fixture()
def build_copy(tiny_build, tmp_path):
    """A copy of the tiny build, for tests where a regression would write into (or delete) the build."""
    copy = tmp_path / "build"
    shutil.copytree(tiny_build, copy)
    return copy


@pytest.mark.parametrize("repository", [".", "sub/repo", ".."], ids=["the build", "inside the build", "holding the build"])
def test_a_repository_that_overlaps_the_build_is_refused_before_any_work(build_copy, tmp_path, repository):
    """``deploy BUILD --triton BUILD --force`` replaced the build with the repository: a command never writes into
    its input."""
    target = (build_copy / repository).resolve()
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["deploy", str(build_copy), "--triton", str(build_copy / repository), "--force"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert f"repository {target} and build {build_copy} overlap" in errors[0]
    assert snapshot(tmp_path) == before
    read_manifest(build_copy)  # whole, every artifact checked


def _deploy(build: Path, repository: Path, **changes) -> dict:
    return deploy(DeployRequest(build, repository, variant="onnxruntime", **changes))


def test_deploy_adds_its_models_beside_others_and_force_replaces_only_its_own(tiny_build, tmp_path):
    repo = tmp_path / "shared"
    other = snapshot(foreign_model(repo))
    (repo / "README.md").write_text("the other team's notes\n")
    ours = {"atedm_unet", "atedm_unet_baseline", "atedm_unet_early", "atedm_unet_main", "atedm-deploy.json"}

    record = _deploy(tiny_build, repo)  # no --force: nothing of anyone's is replaced
    assert {p.name for p in repo.iterdir()} == {"other_model", "README.md", *ours}
    assert snapshot(repo / "other_model") == other and (repo / "README.md").read_text() == "the other team's notes\n"
    assert record["readme"] == "atedm_unet/README.md" and "atedm-export serve" in (repo / "atedm_unet" / "README.md").read_text()
    assert check_repository(repo) == read_manifest(tiny_build)  # only our models are checked: other_model is not ours
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no lock, no hidden work folder left beside it

    with pytest.raises(DeployError, match="already holds an atedm-export deployment .*; pass --force"):
        _deploy(tiny_build, repo, name="second")
    _deploy(tiny_build, repo, name="second", force=True)  # replaces the first deployment, only it
    assert {p.name for p in repo.iterdir()} == {"other_model", "README.md", "atedm-deploy.json", "second",
                                                "second_baseline", "second_early", "second_main"}
    assert snapshot(repo / "other_model") == other and (repo / "README.md").read_text() == "the other team's notes\n"
    check_repository(repo)


@pytest.mark.parametrize("earlier", [False, True], ids=["a foreign folder", "beside an earlier deploy"])
def test_a_name_another_entry_uses_is_refused_and_nothing_changes(tiny_build, tmp_path, earlier):
    """--force replaces what deploy wrote, never someone else's entry that happens to have one of our names."""
    repo = tmp_path / "shared"
    foreign_model(repo, "x_main")  # where the 'main' graph model of --name x would go
    if earlier:
        _deploy(tiny_build, repo)
    before = snapshot(tmp_path)
    with pytest.raises(DeployError, match=f"{repo / 'x_main'} already exists and atedm-export deploy did not write it"):
        _deploy(tiny_build, repo, name="x", force=True)
    assert snapshot(tmp_path) == before


def test_a_record_that_names_a_path_is_refused(tiny_build, tmp_path):
    """The record says what --force may delete; a hand-edited one must not point it elsewhere."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "precious").mkdir()
    (repo / "atedm-deploy.json").write_text(json.dumps({"router": "atedm_unet", "models": {"../precious": {}}}))
    before = snapshot(tmp_path)
    with pytest.raises(DeployError, match="lists model '../precious', which is not a model name"):
        _deploy(tiny_build, repo, force=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fail_at", ["writing", "moving in"])
def test_a_failed_force_deploy_leaves_the_repository_as_it_was(tiny_build, tmp_path, monkeypatch, fail_at):
    """All or nothing: a failure while the models are written, or while they are renamed into place (the
    previous deployment already moved aside, some new models in), puts every entry back."""
    repo = tmp_path / "shared"
    foreign_model(repo)
    _deploy(tiny_build, repo)
    before = snapshot(tmp_path)
    if fail_at == "writing":
        def fail(*args, **kwargs):
            raise OSError(28, "No space left on device", "atedm_unet_main/1/model.py")
        monkeypatch.setattr("atedm_export.deploy.repository._graph_model", fail)
    else:
        real, moved_in = placement._move, []

        def fail(source, target, moves):
            if target.parent == repo:
                moved_in.append(target)
                if len(moved_in) == 2:  # the earlier deploy's entries are aside and one new model is in
                    raise OSError(28, "No space left on device", str(target))
            real(source, target, moves)
        monkeypatch.setattr(placement, "_move", fail)
    with pytest.raises(DeployError, match="deploy failed: No space left on device"):
        _deploy(tiny_build, repo, name="second", force=True)
    assert snapshot(tmp_path) == before
    check_repository(repo)


# --- served requests: the client's errors and the server's -------------------------------------


def test_non_finite_inputs_are_the_clients_error():
    check_finite({"sample": torch.zeros(2, 3), "step": torch.tensor([1, 2], dtype=torch.int32)})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(RequestError, match="input 'sample' holds NaN or infinite values"):
            check_finite({"sample": torch.tensor([0.0, bad])})


def test_a_requests_error_is_invalid_argument_and_a_models_is_internal():
    """What HTTP clients see as 400 (their request) and 500 (the server), through the Python backend's codes."""
    class TritonError:  # pb_utils.TritonError's constructor and code constants
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, message: str, code: str) -> None:
            self.message, self.code = message, code

    model = _PythonModel()
    model.pb = SimpleNamespace(TritonError=TritonError, InferenceResponse=lambda output_tensors, error: error)
    refused = model.error_response(RequestError("step 20 is outside a run of 20 steps"))
    failed = model.error_response(AtedmError("model 'atedm_unet_main' failed: killed"))
    assert (refused.code, refused.message) == ("INVALID_ARG", "step 20 is outside a run of 20 steps")
    assert failed.code == "INTERNAL"


# --- the client's URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://host:1", "must look like http://HOST:PORT"),
    ("http://127.0.0.1", "must look like http://HOST:PORT"),
    ("http://:8000", "must look like http://HOST:PORT"),
    ("http://host:8000/v2", "must look like http://HOST:PORT"),
    ("http://127.0.0.1:notaport", "has port 'notaport'; expected a number from 1 to 65535"),
    ("grpc://127.0.0.1:99999", "has port '99999'; expected a number from 1 to 65535"),
    ("127.0.0.1:0", "has port '0'; expected a number from 1 to 65535"),
    ("http://127.0.0.1:", "has port ''; expected a number from 1 to 65535"),
])
def test_a_bad_url_is_refused_before_a_client_is_made(url, message):
    with pytest.raises(TritonClientError, match=message):
        parse_url(url)


def test_good_urls_parse():
    assert parse_url("http://127.0.0.1:8000") == ("http", "127.0.0.1:8000")
    assert parse_url("grpc://triton.example-1.internal:8001") == ("grpc", "triton.example-1.internal:8001")
    assert parse_url("[::1]:8000") == ("http", "[::1]:8000")


def test_load_test_with_a_bad_port_prints_one_line_and_no_traceback_at_exit():
    """tritonclient's HTTP client, half-built from a port it cannot read, failed again in ``__del__`` when the
    interpreter exited: a traceback after the error line, only visible from a real process."""
    command = [str(Path(sys.executable).parent / "atedm-export"), "load-test", "http://127.0.0.1:notaport"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2
    assert lines == ["error: Triton URL 'http://127.0.0.1:notaport' has port 'notaport'; expected a number from 1 to 65535"]


def test_a_corrupted_artifact_stops_the_deploy_and_leaves_nothing(tiny_build, tmp_path):
    copy = corrupted_copy(tiny_build, tmp_path / "b", "main")
    with pytest.raises(ManifestError, match="main: .* does not match its checksum"):
        deploy(DeployRequest(copy, tmp_path / "repo", variant="onnxruntime"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_check_repository_catches_a_changed_file(ort_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ort_repo, repo)
    graph = repo / "atedm_unet" / "1" / "build" / "onnx" / "early.onnx"
    graph.write_bytes(graph.read_bytes() + b"x")
    with pytest.raises(ManifestError, match="atedm_unet: .*early.onnx does not match its checksum"):
        check_repository(repo)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace('name: "atedm_unet_main"', 'name: "main"'), "name 'main' differs from its folder"),
    (lambda t: t.replace("dims: 32\n", "dims: -1\n", 1), "input 'sample' needs static positive dims"),
    (lambda t: t.replace('backend: "python"', 'backend: "pytorch"'), "backend 'pytorch' is not one deploy writes"),
    (lambda t: t.replace("kind: KIND_CPU", "kind: KIND_GPU").replace('backend: "python"', 'platform: "tensorrt_plan"'),
     "version 1 has no model.plan"),
    (lambda t: t + "dynamic_batching {}\n", "dynamic_batching needs max_batch_size > 0"),
    (lambda t: t.replace("data_type: TYPE_FP32", "data_type: FP32", 1), "not a valid Triton model config"),
    (lambda t: t.replace("count: 1\n", "count: 1\n  gpus: 0\n", 1), "instance group KIND_CPU names GPUs \\[0\\]"),
])
def test_configs_a_server_would_refuse_are_errors(ort_repo, tmp_path, edit, message):
    repo = tmp_path / "repo"
    shutil.copytree(ort_repo, repo)
    path = repo / "atedm_unet_main" / CONFIG
    path.write_text(edit(path.read_text()))
    with pytest.raises(DeployError, match=message):
        read_repository(repo)


def test_tensorrt_plans_need_gpu_instances(ort_repo, tmp_path):
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.plan").write_bytes(b"plan")
    config = parse('name: "m" platform: "tensorrt_plan" input { name: "x" data_type: TYPE_FP32 dims: 1 } '
                   'output { name: "y" data_type: TYPE_FP32 dims: 1 } instance_group { kind: KIND_CPU count: 1 }', "m")
    with pytest.raises(DeployError, match="tensorrt_plan runs KIND_GPU"):
        check_model(folder, config)


def test_gpus_give_each_graph_model_an_instance_group_per_gpu(tiny_build, tmp_path):
    """``--gpus 0,1 --instances 2``: each graph model runs two instances on each GPU (Triton spreads the router's calls
    over them); the router stays on the CPU; the configs pass the checks a server's loading would make."""
    from tritonclient.grpc import model_config_pb2 as pb

    build = tmp_path / "trt"
    with_fake_engines(tiny_build, build, library="tensorrt", module="tensorrt", version="10.13.0", targets=[])
    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["deploy", str(build), "--triton", str(repo), "--gpus", "0,1", "--instances", "2"])
    assert result.exit_code == 0, result.output
    check_repository(repo)
    configs = read_repository(repo)
    for graph in ("baseline", "early", "main"):
        groups = [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count, list(g.gpus))
                  for g in configs[f"atedm_unet_{graph}"].instance_group]
        assert groups == [("KIND_GPU", 2, [0]), ("KIND_GPU", 2, [1])]
    assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus)) for g in configs["atedm_unet"].instance_group] == [
        ("KIND_CPU", [])]
    assert json.loads((repo / "atedm-deploy.json").read_text())["gpus"] == [0, 1]


def test_a_gpu_placed_twice_is_refused(ort_repo, tmp_path):
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.plan").write_bytes(b"plan")
    config = parse('name: "m" platform: "tensorrt_plan" input { name: "x" data_type: TYPE_FP32 dims: 1 } '
                   'output { name: "y" data_type: TYPE_FP32 dims: 1 } instance_group { kind: KIND_GPU count: 1 gpus: 0 }'
                   ' instance_group { kind: KIND_GPU count: 1 gpus: [0, 1] }', "m")
    with pytest.raises(DeployError, match=r"instance groups place GPUs \[0, 0, 1\]; expected each GPU once"):
        check_model(folder, config)


def test_link_hard_links_the_artifacts(tiny_build, tmp_path):
    """One copy of the weights on disk for the build and its repository; the linked graphs still load."""
    import onnxruntime as ort

    source = tmp_path / "b"  # a copy: the session's build must keep one link per file (onnx.checker wants that)
    shutil.copytree(tiny_build, source)
    repo = tmp_path / "repo"
    deploy(DeployRequest(source, repo, variant="onnxruntime", link=True))
    manifest = read_manifest(source)
    entry = first_view(manifest).graph("main")
    build = repo / "atedm_unet" / "1" / "build"
    for item in (entry.onnx, manifest.weights):
        assert (build / item.path).stat().st_ino == (source / item.path).stat().st_ino
    session = ort.InferenceSession(str(build / entry.onnx.path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "latent"
    check_repository(repo)


# --- a multi-shape build: one router over every shape ---------------------------------------------


MULTI_KEYS = ["128x128-b2", "192x128-b2", "128x128-b4"]  # conftest.MULTI_SPEC's shapes


@pytest.fixture(scope="module")
def multi_repo(tiny_multi_build, tmp_path_factory):
    """The session's three-shape build (conftest ``MULTI_SPEC``) deployed, onnxruntime variant."""
    repo = tmp_path_factory.mktemp("deploy-multi") / "repo"
    deploy(DeployRequest(tiny_multi_build, repo, variant="onnxruntime"))
    return repo


@pytest.mark.slow  # the 3-shape build: ~80 s of exports
def test_multi_shape_repository_has_a_graph_model_per_shape_and_stage(multi_repo, tiny_multi_build):
    manifest = read_manifest(tiny_multi_build)
    assert [s.key for s in manifest.shape_list] == MULTI_KEYS
    configs = read_repository(multi_repo)
    graphs = {f"{g}.{key}": f"atedm_unet_{g}_{key}" for key in MULTI_KEYS for g in ("baseline", "main")}
    assert sorted(configs) == sorted(["atedm_unet", *graphs.values()])
    assert check_repository(multi_repo) == manifest
    for view in views(manifest):
        for graph in ("baseline", "main"):
            config = configs[f"atedm_unet_{graph}_{view.shape.key}"]
            assert config.parameters["atedm_graph"].string_value == graph
            assert json.loads(config.parameters["atedm_shape"].string_value) == view.shape.model_dump()
            assert [(i.name, list(i.dims)) for i in config.input] == [(t.name, t.shape) for t in view.inputs]
            assert [(o.name, list(o.dims)) for o in config.output] == [("latent", view.outputs[0].shape)]
            assert view.outputs[0].shape == [view.shape.batch, 4, 16, view.shape.width // 8]
    router = configs["atedm_unet"]
    assert router.max_batch_size == 4  # the largest batch of the build's shapes
    # latent height 16 at every shape, width 16 or 24: variable (-1) only where the shapes differ
    assert [(i.name, list(i.dims)) for i in router.input] == [
        ("sample", [4, 16, -1]), ("timestep", [1]), ("encoder_hidden_states", [77, 32]), ("step", [1]),
        ("num_steps", [1])]
    assert [(o.name, list(o.dims)) for o in router.output] == [("latent", [4, 16, -1]), ("stage", [1])]
    record = json.loads((multi_repo / "atedm-deploy.json").read_text())
    assert record["models"]["atedm_unet"]["routes"] == graphs  # the router calls each graph's model by its name
    weights = list(multi_repo.rglob("*.onnx.data"))
    assert weights == [multi_repo / "atedm_unet" / "1" / "build" / manifest.weights.path]  # one copy for every shape
    record = json.loads((multi_repo / "atedm-deploy.json").read_text())
    assert record["shapes"] == MULTI_KEYS and record["max_batch"] == 4
    assert record["models"]["atedm_unet_main_192x128-b2"]["graph"] == "main.192x128-b2"
    readme = (multi_repo / "README.md").read_text()
    assert all(f"`atedm_unet_main_{key}`" in readme for key in MULTI_KEYS)
    assert "| `sample` (in) | FP32 | `[b, 4, 16, w]` |" in readme


@pytest.mark.slow  # the 3-shape build: ~80 s of exports
def test_the_router_picks_each_requests_shape_and_a_missing_one_is_one_line(tiny_multi_build):
    """Shape by (rows, latent height, width) through the manifest's lookup: the shape of exactly those rows, else the
    next larger batch at that size (padded), else the largest (chunked); an unbuilt size names the shapes."""
    router = Router(read_manifest(tiny_multi_build, verify=False))
    asked = ((2, 16, 16), (4, 16, 16), (2, 16, 24), (1, 16, 24), (3, 16, 16), (1, 16, 16), (6, 16, 16))
    picked = {rows_hw: router.view_for(*rows_hw).shape.key for rows_hw in asked}
    assert picked == {(2, 16, 16): "128x128-b2", (4, 16, 16): "128x128-b4", (2, 16, 24): "192x128-b2",
                      (1, 16, 24): "192x128-b2", (3, 16, 16): "128x128-b4", (1, 16, 16): "128x128-b2",
                      (6, 16, 16): "128x128-b4"}
    with pytest.raises(ShapeError) as caught:
        router.view_for(2, 16, 20)
    assert str(caught.value) == ("no graphs for batch 2 at 160x128 px (latent 20x16); this build has: 128x128-b2, "
                                 "192x128-b2, 128x128-b4")
    # a pair at 128x128, one row at 192x128, a pair at 192x128, three rows at 128x128 (the batch-4 graph, padded)
    views = [router.view_for(2, 16, 16), router.view_for(1, 16, 24), router.view_for(2, 16, 24),
             router.view_for(3, 16, 16)]
    chunks = router.plan([["main"] * 2, ["main"], ["main"] * 2, ["main"] * 3], views)
    assert [(c.graph, c.rows, c.batch) for c in chunks] == [
        ("main.128x128-b2", ((0, 0), (0, 1)), 2),
        ("main.192x128-b2", ((1, 0), (2, 0)), 2), ("main.192x128-b2", ((2, 1),), 2),
        ("main.128x128-b4", ((3, 0), (3, 1), (3, 2)), 4),
    ]
    feeds = [{name: torch.full((rows, 4, 16, width), float(i)) for name in router.input_names}
             for i, (rows, width) in enumerate(((2, 16), (1, 24), (2, 24), (3, 16)))]
    assert router.gather(chunks[0], feeds)["sample"] is feeds[0]["sample"]  # a whole request passes through
    assert router.gather(chunks[1], feeds)["sample"][:, 0, 0, 0].tolist() == [1.0, 2.0]  # two requests' rows
    assert router.gather(chunks[3], feeds)["sample"].shape == (4, 4, 16, 16)  # padded to the batch of 4


@pytest.mark.slow  # the 3-shape build: ~80 s of exports
def test_a_graph_model_at_another_shapes_dims_is_refused(multi_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(multi_repo, repo)
    path = repo / "atedm_unet_main_192x128-b2" / CONFIG
    path.write_text(path.read_text().replace("dims: 24\n", "dims: 16\n"))
    with pytest.raises(DeployError, match=r"atedm_unet_main_192x128-b2/config.pbtxt: inputs and outputs differ from "
                                          r"the build's static graph I/O \(shape 192x128-b2\)"):
        check_repository(repo, files=False)


# --- Kubernetes (deploy --kubernetes) ----------------------------------------------------------------------------


def test_kubernetes_manifests_for_a_cpu_repository_validate_and_apply_as_written(tiny_build, tmp_path):
    """``--kubernetes DIR`` beside the repository: a kustomization over plain manifests and one for KServe, each file
    the YAML of a manifest that passed the schemas (strict), KServe's models and the cross-manifest rules."""
    import yaml

    from atedm_export.deploy.kubernetes import Cluster, check_manifests

    repo, k8s = tmp_path / "repo", tmp_path / "k8s"
    result = CliRunner().invoke(main, ["deploy", str(tiny_build), "--triton", str(repo), "--kubernetes", str(k8s),
                                       "--storage-uri", "s3://models/atedm", "--load-seconds", "12"])
    assert result.exit_code == 0, result.output
    files = {p.relative_to(k8s).as_posix(): yaml.safe_load(p.read_text()) for p in k8s.rglob("*.yaml")}
    assert set(files) == {"kustomization.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml",
                          "kserve/kustomization.yaml", "kserve/servingruntime.yaml", "kserve/inferenceservice.yaml"}
    assert files["kustomization.yaml"]["resources"] == ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
    container = files["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert "--model-repository=s3://models/atedm" in container["args"] and "--model-control-mode=explicit" in container["args"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]  # the onnxruntime variant: CPU pods
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 3 * 12
    assert files["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"]["storageUri"] == "s3://models/atedm"
    record = json.loads((k8s / "atedm-kubernetes.json").read_text())
    assert record["repository"] == str(repo.resolve()) and "Dockerfile" in record["files"]
    cluster = Cluster(name="atedm-unet", variant="onnxruntime", gpus=1, repository_bytes=1, load_seconds=12,
                      storage_uri="s3://models/atedm")
    check_manifests(files, cluster)  # what was written is what was checked


def test_kubernetes_for_a_gpu_repository_requests_its_gpus_and_mounts_a_volume(tiny_build, tmp_path):
    build = tmp_path / "trt"
    with_fake_engines(tiny_build, build, library="tensorrt", module="tensorrt", version="10.13.0", targets=[])
    k8s = tmp_path / "k8s"
    result = CliRunner().invoke(main, ["deploy", str(build), "--triton", str(tmp_path / "repo"), "--gpus", "0,1",
                                       "--kubernetes", str(k8s)])
    assert result.exit_code == 0, result.output
    assert "model-load time taken as" in result.output  # no --load-seconds: said, not silently guessed
    import yaml

    deployment = yaml.safe_load((k8s / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "atedm-unet-models"
    assert (k8s / "pvc.yaml").is_file() and (k8s / "kserve" / "pvc.yaml").is_file()
    isvc = yaml.safe_load((k8s / "kserve" / "inferenceservice.yaml").read_text())
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == "pvc://atedm-unet-models/"


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
     .__setitem__("port", "htp"), "readinessProbe port 'htp' is not a port the container opens"),
    (lambda f: f["service.yaml"]["spec"]["ports"][1].__setitem__("targetPort", "grcp"),
     "port 'grpc' targets 'grcp', which the container does not open"),
    (lambda f: f["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .pop("nvidia.com/gpu"), "a GPU build's server requests no nvidia.com/gpu"),
    (lambda f: f["service.yaml"]["spec"]["ports"][0].__setitem__("portz", 1), "'portz' was unexpected"),
    (lambda f: f["hpa.yaml"]["spec"].__setitem__("maxReplicas", "four"), "hpa.yaml: spec.maxReplicas: 'four' is not"),
    (lambda f: f["kserve/inferenceservice.yaml"]["spec"]["predictor"].__setitem__("modle", {}),
     "unknown field 'modle' of V1beta1PredictorSpec; did you mean 'model'"),
    (lambda f: f["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"].__setitem__("runtime", "other"),
     "runtime 'other' is not the ServingRuntime written beside it"),
    (lambda f: f["kustomization.yaml"]["resources"].append("missing.yaml"), "resources \\['missing.yaml'\\]"),
])
def test_a_broken_manifest_is_caught(edit, message):
    """The check catches what a cluster would refuse (schemas, KServe's models) and what would apply but not serve
    (a probe on a port the container does not open, a GPU build without GPUs, a Service missing its pods)."""
    from atedm_export.deploy.kubernetes import Cluster, KubernetesError, check_manifests, manifests

    cluster = Cluster(name="atedm-unet", variant="tensorrt", gpus=1, repository_bytes=2**30, load_seconds=30)
    files = manifests(cluster)
    check_manifests(files, cluster)
    edit(files)
    with pytest.raises(KubernetesError, match=message):
        check_manifests(files, cluster)
