"""A deployment's versions without a server: ``deploy --next-version`` adds a build beside the serving one, and
retiring leaves only the newest (the server side, ``rollout`` under load, is in tests/test_rollout.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from atedm_export.buildfolder import manifest_sha256, read_manifest
from atedm_export.cli import main
from atedm_export.deploy.config import CONFIG, DeployError, model_versions, read_repository
from atedm_export.deploy.repository import DeployRequest, check_repository, deploy
from atedm_export.deploy.serving import MANIFEST_PARAMETER
from atedm_export.deploy.versions import next_version, retire_old_versions

from .test_deploy import snapshot

MODELS = ["atedm_unet", "atedm_unet_baseline", "atedm_unet_main"]


@pytest.fixture()
def repo(tiny_tome_build, tmp_path):
    """The ToMe build deployed (onnxruntime): version 1 of a router and its two graph models."""
    out = tmp_path / "repo"
    deploy(DeployRequest(tiny_tome_build, out, variant="onnxruntime"))
    return out


def test_a_refit_becomes_version_2_beside_version_1(repo, refitted, tiny_tome_build):
    folder, _ = refitted
    configs = {m: (repo / m / CONFIG).stat().st_mtime_ns for m in MODELS[1:]}
    record = next_version(DeployRequest(folder, repo, variant="onnxruntime"))
    assert record["version"] == 2 and sorted(record["versions"]) == ["1", "2"]
    assert record["versions"]["2"]["manifest_sha256"] == manifest_sha256(folder) == record["manifest_sha256"]
    assert record["versions"]["1"]["manifest_sha256"] == manifest_sha256(tiny_tome_build)
    assert sorted(record["models"]) == MODELS
    for model in MODELS:
        assert model_versions(repo / model) == [1, 2] and record["models"][model]["versions"] == [1, 2]
    # each router version routes by its own build; the config publishes the newest for clients
    assert read_manifest(repo / "atedm_unet" / "1" / "build") == read_manifest(tiny_tome_build)
    assert read_manifest(repo / "atedm_unet" / "2" / "build") == read_manifest(folder)
    router = read_repository(repo)["atedm_unet"]
    assert json.loads(router.parameters[MANIFEST_PARAMETER].string_value) == json.loads(
        read_manifest(folder).model_dump_json())
    # the graph models' configs (every version's) are not rewritten: Triton would reload the serving version
    assert {m: (repo / m / CONFIG).stat().st_mtime_ns for m in MODELS[1:]} == configs
    assert check_repository(repo) == read_manifest(folder)  # every file of both versions against its sha256


def test_retiring_leaves_only_the_newest_version(repo, refitted):
    next_version(DeployRequest(refitted[0], repo, variant="onnxruntime"))
    record = retire_old_versions(repo)
    assert record["version"] == 2 and list(record["versions"]) == ["2"]
    for model in MODELS:
        assert model_versions(repo / model) == [2] and record["models"][model]["versions"] == [2]
        assert all(f["path"].startswith(f"{model}/2/") for f in record["models"][model]["files"])
    assert json.loads((repo / "atedm-deploy.json").read_text()) == record
    assert check_repository(repo) == read_manifest(refitted[0])
    assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]  # nothing aside, no lock left


@pytest.mark.parametrize(("same", "options", "message"), [
    (True, {}, "is already version 1 of"),
    (False, {"instances": 2}, "would change atedm_unet/config.pbtxt, which every version of the model shares"),
    (False, {"max_batch": 4}, "would change atedm_unet/config.pbtxt"),
    (False, {"name": "other"}, "deployment is router 'atedm_unet', not 'other'"),
    (False, {"variant": "tensorrt"}, "has no engines"),
])
def test_what_a_new_version_may_not_change_is_refused_and_nothing_is_written(repo, tiny_tome_build, refitted, same,
                                                                            options, message):
    before = snapshot(repo)
    with pytest.raises(DeployError, match=message):
        next_version(DeployRequest(tiny_tome_build if same else refitted[0], repo,
                                   **{"variant": "onnxruntime", **options}))
    assert snapshot(repo) == before
    assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]


def test_a_build_of_other_shapes_is_refused(repo, tiny_build):
    before = snapshot(repo)
    with pytest.raises(DeployError, match="has shapes .* where .* serves .*; a new version keeps the clients. shapes"):
        next_version(DeployRequest(tiny_build, repo, variant="onnxruntime"))
    assert snapshot(repo) == before


def test_a_repository_of_the_older_format_is_refused_in_one_line(repo, refitted, tmp_path):
    record = json.loads((repo / "atedm-deploy.json").read_text())
    (repo / "atedm-deploy.json").write_text(json.dumps({**record, "format": "atedm-export.deploy/1"}))
    result = CliRunner().invoke(main, ["deploy", str(refitted[0]), "--triton", str(repo), "--next-version"])
    assert result.exit_code == 2, result.output
    assert "deployed by an older atedm-export (atedm-export.deploy/1" in result.output
    assert "Traceback" not in result.output


def test_a_failure_while_merging_puts_everything_back(repo, refitted, monkeypatch):
    from atedm_export.deploy import placement

    before = snapshot(repo)
    moved = []
    real = placement._move

    def failing(source, target, moves):  # noqa: ANN001, ANN202
        if len(moved) == 3:  # after two graph models' version folders, before the router's
            raise OSError(28, "No space left on device", str(target))
        moved.append(target)
        real(source, target, moves)

    monkeypatch.setattr(placement, "_move", failing)
    with pytest.raises(DeployError, match="No space left on device"):
        next_version(DeployRequest(refitted[0], repo, variant="onnxruntime"))
    assert snapshot(repo) == before


def test_deploy_next_version_through_the_cli(repo, refitted):
    result = CliRunner().invoke(main, ["deploy", str(refitted[0]), "--triton", str(repo), "--next-version"])
    assert result.exit_code == 0, result.output
    assert "wrote version 2 into" in result.output
    assert f"atedm-export rollout {repo} --url URL" in result.output.replace("\n", "")
    result = CliRunner().invoke(main, ["deploy", str(refitted[0]), "--triton", str(repo), "--next-version", "--force"])
    assert result.exit_code == 2 and "--force and --kubernetes are for a deployment written anew" in result.output


def test_a_version_folder_missing_its_model_file_is_one_line(repo, refitted, tmp_path):
    next_version(DeployRequest(refitted[0], repo, variant="onnxruntime"))
    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    (broken / "atedm_unet_main" / "2" / "model.py").unlink()
    with pytest.raises(DeployError, match="atedm_unet_main/config.pbtxt: version 2 has no model.py"):
        check_repository(broken)
    shutil.rmtree(broken / "atedm_unet_main" / "2")
    with pytest.raises(DeployError, match="version 2 calls model 'atedm_unet_main' at version 2, which it lacks"):
        check_repository(broken, files=False)


def test_retiring_with_nothing_older_changes_nothing(repo):
    before = snapshot(repo)
    assert retire_old_versions(repo)["version"] == 1
    assert snapshot(repo) == before
