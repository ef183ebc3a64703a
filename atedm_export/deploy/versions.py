"""The versions of a deployment: a new build added as the next version of every model, and the old ones retired.

A refit with a new LoRA or a new schedule is a new build of the same served UNet. ``next_version`` writes it into
the deployed repository beside the serving version, as version N+1 of every model (``deploy --next-version``),
without touching what the running servers read; ``rollout`` then moves each server to it and calls
``retire_old_versions``, which removes every version but the newest from the repository.

What may change from one version to the next is what clients cannot see: the weights, the schedule, the graphs
(a graph model the new schedule adds is new; one it drops goes when the old version is retired). What may not:
the router's inputs and outputs (its shapes, batch and precision: the clients' contract), the variant, and the
serving options in the models' configs (instances, GPUs, batching), since a config is every version's and Triton
would reload the serving version with a changed one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ..buildfolder import Manifest, check_files, manifest_sha256, read_manifest
from ..staging import check_apart, exclusive, write_atomically
from .config import CONFIG, DeployError, model_versions, parse, router_tensors, version_manifests
from .placement import hidden_folder, staged_version
from .readme import repository_readme
from .layout import RECORD
from .repository import (DeployRequest, Progress, check_free, model_names, check_repository, current_record,
                         make_record, resolve_variant, version_record, write_version)
from .serving import MANIFEST_PARAMETER


def _check_contract(serving: Manifest, manifest: Manifest, build: Path, repository: Path) -> None:
    """The new build takes and gives what the deployment's clients send and read: the same shapes and router I/O."""
    mine, theirs = [s.key for s in serving.shape_list], [s.key for s in manifest.shape_list]
    if mine != theirs:
        raise DeployError(f"{build} has shapes {', '.join(theirs)} where {repository} serves {', '.join(mine)}; a new "
                          "version keeps the clients' shapes: deploy it as another model (--name) instead")
    if router_tensors(serving) != router_tensors(manifest):
        raise DeployError(f"{build} takes or gives other tensors than {repository} serves (names, types or dims); a new "
                          "version keeps the clients' inputs and outputs: deploy it as another model (--name) instead")


def _check_same_configs(work: Path, repository: Path, record: dict) -> None:
    """Every model both versions have keeps its config; the router's differs only in the manifest it publishes."""
    options = (f"instances {record['instances']}, GPUs {record['gpus'] or 'all'}, "
               f"up to {record['max_batch']} rows per router call")
    for folder in sorted(p for p in work.iterdir() if p.is_dir() and (repository / p.name / CONFIG).is_file()):
        new, old = (folder / CONFIG).read_text(), (repository / folder.name / CONFIG).read_text()
        if folder.name == record["router"]:
            configs = [parse(text, f"{folder.name}/{CONFIG}") for text in (new, old)]
            for config in configs:
                del config.parameters[MANIFEST_PARAMETER]
            same = configs[0] == configs[1]
        else:
            same = new == old
        if not same:
            raise DeployError(f"the new version would change {folder.name}/{CONFIG}, which every version of the model "
                              f"shares; a new version keeps the deployment's serving options ({options}): pass the "
                              "same options, or deploy anew with --force")
        if folder.name != record["router"]:
            (folder / CONFIG).unlink()  # left as it is: Triton reloads every version of a model whose config file changes


def _merged_models(record: dict, models: dict[str, dict], version: int) -> dict[str, dict]:
    """The record's models with the new version's: each model's files and versions added, its routes the newest."""
    merged = {name: dict(info) for name, info in record["models"].items()}
    for name, info in models.items():
        old = merged.get(name, {"files": [], "versions": []})
        merged[name] = {**info, "files": [*old["files"], *info["files"]], "versions": [*old["versions"], version]}
    return merged


def next_version(request: DeployRequest, progress: Progress = lambda model, event: None) -> dict:
    """Add ``request.build`` to the deployment in ``request.repository`` as the next version of every model; returns
    the new record. The serving version and every file of it stay as they are; every check comes first."""
    build, out = request.build.resolve(), request.repository.resolve()
    check_apart(out, {"build": build}, "repository", DeployError)
    record = current_record(out)
    if request.name != record["router"]:
        raise DeployError(f"{out}'s deployment is router '{record['router']}', not '{request.name}'; pass "
                          f"--name {record['router']} (or leave --name out)")
    serving = check_repository(out, files=False)
    manifest = read_manifest(build, verify=False)
    request = resolve_variant(dataclasses.replace(request, build=build), manifest, progress)
    if request.variant != record["variant"]:
        raise DeployError(f"{out} serves the {record['variant']} variant and {build} would be the {request.variant} "
                          f"variant; a new version is of the same variant (pass --variant {record['variant']})")
    sha = manifest_sha256(build)
    same = [v for v, info in record["versions"].items() if info["manifest_sha256"] == sha]
    if same:
        raise DeployError(f"{build} is already version {same[0]} of {out}; a new version is another build "
                          "(a refit, a new schedule)")
    _check_contract(serving, manifest, build, out)
    version = 1 + max([record["version"], *(v for m in record["models"] for v in model_versions(out / m))])
    check_free(out, [m for m in model_names(request, manifest) if m not in record["models"]], frozenset())
    check_files(manifest, build, engines=request.variant == "tensorrt")
    max_batch = request.max_batch or record["max_batch"]
    with staged_version(out, last=request.name, check=lambda: check_repository(out, files=False)) as work:
        models = write_version(work, request, manifest, version, max_batch, progress)
        _check_same_configs(work, out, record)
        versions = {**record["versions"], str(version): version_record(request, manifest)}
        record = make_record(request, manifest, max_batch, record["readme"], versions,
                             _merged_models(record, models, version))
        (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (work / record["readme"]).parent.mkdir(parents=True, exist_ok=True)
        (work / record["readme"]).write_text(repository_readme(record, manifest))
        progress("repository", f"version {version} beside version(s) {', '.join(sorted(record['versions'])[:-1])}; "
                               "configs checked with Triton's ModelConfig")
    return record


def retire_old_versions(repository: Path, progress: Progress = lambda model, event: None) -> dict:
    """Remove every version but the newest from the deployment's models (a model the newest lacks goes whole), then
    rewrite the record; returns it. Call it once no server runs an old router version (``rollout`` does).

    Each folder is renamed aside before it is deleted, so no half-deleted version is ever visible; a run cut short
    leaves the record listing versions already gone, and running it again finishes the work.
    """
    out = repository.resolve()
    with exclusive(out, "deploy"):
        record = current_record(out)
        newest = record["version"]
        if all(info["versions"] == [newest] for info in record["models"].values()):
            return record  # nothing older: the files stay as they are (a rewritten README would change the router)
        aside = hidden_folder(out, "old")
        try:
            models = _retire(out, aside, record, newest, progress)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        manifest = version_manifests(out, record["router"])[newest]
        record = {**record, "versions": {str(newest): record["versions"][str(newest)]}, "models": models}
        write_atomically(out / RECORD, json.dumps(record, indent=2) + "\n")
        write_atomically(out / record["readme"], repository_readme(record, manifest))
    return record


def _retire(out: Path, aside: Path, record: dict, newest: int, progress: Progress) -> dict[str, dict]:
    """Move aside every old version folder the record lists (a model with no newest version: its folder); returns
    the models' records as they are left."""
    models = {}
    for model, info in record["models"].items():
        old = [v for v in info["versions"] if v != newest]
        if newest not in info["versions"]:
            if (out / model).exists():
                (out / model).rename(aside / model)
            progress(model, f"removed: version {newest} does not use it")
            continue
        for version in old:
            if (out / model / str(version)).exists():
                (out / model / str(version)).rename(aside / f"{model}.{version}")
        if old:
            progress(model, f"version(s) {', '.join(map(str, old))} removed, {newest} kept")
        prefixes = tuple(f"{model}/{v}/" for v in old)
        models[model] = {**info, "versions": [newest], "files": [f for f in info["files"] if not f["path"].startswith(prefixes)]}
    return models
