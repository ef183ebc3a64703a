"""Kubernetes for a Triton repository: plain manifests with a kustomization, and KServe's InferenceService.

``deploy BUILD --triton REPO --kubernetes DIR`` writes what a cluster needs to serve REPO, as plain YAML that
``kubectl apply -k`` takes as it is (no templating; the image is set by kustomize's ``images:``)::

    DIR/kustomization.yaml     the plain set: kubectl apply -k DIR
    DIR/deployment.yaml        tritonserver, its repository from a volume or an object store (s3://, gs://, as://,
                               which Triton reads itself), GPU requests, startup/readiness/liveness probes on Triton's
                               health endpoints sized by the model-load time
    DIR/service.yaml           the HTTP, gRPC and metrics ports
    DIR/hpa.yaml               a HorizontalPodAutoscaler on Triton's queue time per request (Prometheus adapter)
    DIR/pdb.yaml               a PodDisruptionBudget: one server stays up through node drains
    DIR/pvc.yaml               the repository's volume, where no object-store URI is given
    DIR/kserve/                the same service as KServe's InferenceService with a ServingRuntime of this image
    DIR/Dockerfile             the image: NGC's tritonserver with atedm-export (the router model imports it)
    DIR/atedm-kubernetes.json  what was written, from which repository (what --force may replace)

Every manifest is checked before anything is written: against the Kubernetes schemas (``kubernetes-validate``,
strict: an unknown field is an error), KServe's against its own models (``kserve``), and all against the rules the
schemas cannot state (a probe's port is one the container opens, the Service selects the pods, a GPU build asks
for GPUs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AtedmError
from ..isolated import run_isolated
from .server import MODEL_CONTROL

KUBERNETES_VERSION = "1.33.0"  # the schemas the manifests are validated against (kubernetes-validate ships them)
IMAGE = "atedm-tritonserver"  # the image name in every manifest; kustomization.yaml's images: sets the real one
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # tritonserver's defaults
KSERVE_PORTS = {"http": 8080, "grpc": 9000}  # what KServe's Triton runtime listens on
GPU = "nvidia.com/gpu"
RECORD = "atedm-kubernetes.json"
OBJECT_STORES = ("s3://", "gs://", "as://")
QUEUE_METRIC = "atedm_queue_us_per_request"  # the Prometheus adapter's rule, docs/deploy.md


class KubernetesError(AtedmError):
    """A manifest a cluster would refuse, or one that would not serve the repository."""


@dataclass(frozen=True)
class Cluster:
    """How the repository is served on a cluster."""

    name: str  # the Deployment, Service and InferenceService name (DNS-1123)
    variant: str  # tensorrt (GPU pods) | onnxruntime (CPU pods)
    gpus: int  # per pod (tensorrt): the repository's --gpus, at least one
    repository_bytes: int  # what the volume must hold
    load_seconds: float  # model-load time: the startup probe waits several times that
    storage_uri: str | None = None  # s3://, gs:// or as:// where the repository is uploaded; None: a volume
    max_replicas: int = 4
    queue_target_us: int = 50_000  # the HPA adds pods above this mean queue time per request


def check_cluster(cluster: Cluster) -> None:
    """The options, each refused in one line before anything is written."""
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", cluster.name):
        raise KubernetesError(f"name '{cluster.name}' is not a Kubernetes name; expected lower-case letters, digits "
                              "and '-', at most 63 (e.g. atedm-unet)")
    if cluster.storage_uri is not None and not cluster.storage_uri.startswith(OBJECT_STORES):
        raise KubernetesError(f"--storage-uri {cluster.storage_uri}: expected one of {', '.join(OBJECT_STORES)}, which "
                              "Triton reads itself (or leave it out for a volume)")
    if not cluster.load_seconds > 0 or not math.isfinite(cluster.load_seconds):
        raise KubernetesError(f"--load-seconds {cluster.load_seconds}: expected a positive number of seconds")
    if cluster.max_replicas < 1:
        raise KubernetesError(f"--max-replicas {cluster.max_replicas}: expected 1 or more")


def _labels(cluster: Cluster) -> dict[str, str]:
    return {"app.kubernetes.io/name": cluster.name, "app.kubernetes.io/part-of": "atedm-export"}


def _gib(nbytes: float) -> str:
    return f"{max(1, math.ceil(nbytes / 2**30))}Gi"


def _resources(cluster: Cluster) -> dict[str, Any]:
    """Memory for the graphs twice over (the served copies and the loading), CPUs for the router; GPUs by limit
    (the device plugin reads limits)."""
    requests: dict[str, Any] = {"cpu": "2", "memory": _gib(2 * cluster.repository_bytes + 2**30)}
    limits: dict[str, Any] = {"memory": requests["memory"]}
    if cluster.variant == "tensorrt":
        requests[GPU] = limits[GPU] = str(cluster.gpus)  # a quantity: a string, as KServe's models type it
    return {"requests": requests, "limits": limits}


def _probes(cluster: Cluster, port: str) -> dict[str, Any]:
    """Triton's health endpoints. Startup allows three times the model-load time (and at least two minutes), so a
    slow first load is not killed; afterwards readiness takes a server out of the Service within seconds."""
    period = 5
    startup = max(120.0, 3 * cluster.load_seconds)
    return {
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": port}, "periodSeconds": period,
                         "failureThreshold": math.ceil(startup / period)},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": port}, "periodSeconds": period,
                           "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": port}, "periodSeconds": 10,
                          "failureThreshold": 3},
    }


def _server_args(repository: str) -> list[str]:
    control = [f"{flag}={value}" for flag, value in zip(MODEL_CONTROL[::2], MODEL_CONTROL[1::2])]  # as serve runs it
    return [f"--model-repository={repository}", *control, "--exit-timeout-secs=30", "--strict-readiness=true"]


def deployment(cluster: Cluster) -> dict[str, Any]:
    labels = _labels(cluster)
    container: dict[str, Any] = {
        "name": "tritonserver", "image": IMAGE, "command": ["tritonserver"],
        "args": _server_args(cluster.storage_uri or "/models"),
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],  # the models' folders stay as deployed
        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
        "resources": _resources(cluster), **_probes(cluster, "http"),
    }
    pod: dict[str, Any] = {"containers": [container], "terminationGracePeriodSeconds": 60}
    if cluster.storage_uri:  # the object store's credentials, where the cluster keeps them
        container["envFrom"] = [{"secretRef": {"name": f"{cluster.name}-storage", "optional": True}}]
    else:
        container["volumeMounts"] = [{"name": "models", "mountPath": "/models", "readOnly": True}]
        pod["volumes"] = [{"name": "models", "persistentVolumeClaim": {"claimName": f"{cluster.name}-models",
                                                                        "readOnly": True}}]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": cluster.name, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels, "annotations": {
                     "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"])}}, "spec": pod}},
    }


def service(cluster: Cluster) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": cluster.name, "labels": _labels(cluster)},
            "spec": {"selector": _labels(cluster), "ports": [
                {"name": name, "port": port, "targetPort": name} for name, port in PORTS.items()]}}


def autoscaler(cluster: Cluster) -> dict[str, Any]:
    """More servers when requests wait: Triton's queue time per request, a pod metric the Prometheus adapter makes
    from ``nv_inference_queue_duration_us`` and ``nv_inference_request_success`` (docs/deploy.md has the rule)."""
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": cluster.name},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": cluster.name},
                 "minReplicas": 1, "maxReplicas": cluster.max_replicas,
                 "metrics": [{"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC}, "target": {
                     "type": "AverageValue", "averageValue": str(cluster.queue_target_us)}}}]},
    }


def disruption_budget(cluster: Cluster) -> dict[str, Any]:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": cluster.name},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": _labels(cluster)}}}


def volume_claim(cluster: Cluster) -> dict[str, Any]:
    """The repository's volume, read by every pod: copy the repository into it once (docs/deploy.md)."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{cluster.name}-models"},
            "spec": {"accessModes": ["ReadOnlyMany"],
                     "resources": {"requests": {"storage": _gib(1.5 * cluster.repository_bytes)}}}}


def serving_runtime(cluster: Cluster) -> dict[str, Any]:
    """KServe's runtime for this repository: the image with atedm-export, on KServe's ports and mount."""
    container = {
        "name": "kserve-container", "image": IMAGE, "command": ["tritonserver"],
        "args": [*_server_args("/mnt/models"), f"--http-port={KSERVE_PORTS['http']}",
                 f"--grpc-port={KSERVE_PORTS['grpc']}", "--allow-http=true", "--allow-grpc=true"],
        "env": [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "ports": [{"name": "h2c", "containerPort": KSERVE_PORTS["grpc"], "protocol": "TCP"}],
        "resources": _resources(cluster),
    }
    return {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime",
            "metadata": {"name": f"{cluster.name}-runtime"},
            "spec": {"supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
                     "protocolVersions": ["v2", "grpc-v2"], "containers": [container]}}


def inference_service(cluster: Cluster) -> dict[str, Any]:
    storage = cluster.storage_uri or f"pvc://{cluster.name}-models/"
    model = {"modelFormat": {"name": "triton"}, "runtime": f"{cluster.name}-runtime", "storageUri": storage,
             "resources": _resources(cluster), **_probes(cluster, str(KSERVE_PORTS["http"]))}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        model[probe]["httpGet"]["port"] = KSERVE_PORTS["http"]
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": {"name": cluster.name},
            "spec": {"predictor": {"minReplicas": 1, "maxReplicas": cluster.max_replicas, "model": model}}}


def _kustomization(files: list[str]) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": files,
            "images": [{"name": IMAGE, "newName": "registry.example.com/atedm-tritonserver", "newTag": "latest"}]}


def manifests(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every file of DIR (relative path → its one YAML document)."""
    plain = {"deployment.yaml": deployment(cluster), "service.yaml": service(cluster),
             "hpa.yaml": autoscaler(cluster), "pdb.yaml": disruption_budget(cluster)}
    if not cluster.storage_uri:
        plain["pvc.yaml"] = volume_claim(cluster)
    served = {"kserve/servingruntime.yaml": serving_runtime(cluster),
              "kserve/inferenceservice.yaml": inference_service(cluster)}
    if not cluster.storage_uri:  # kustomize reads no file outside its folder: the volume's claim is written twice
        served["kserve/pvc.yaml"] = volume_claim(cluster)
    return {**plain, "kustomization.yaml": _kustomization(list(plain)), **served,
            "kserve/kustomization.yaml": _kustomization([Path(name).name for name in served])}


# --- checks: the schemas, KServe's models, and the rules between manifests -----------------------------------------


def check_manifests(files: dict[str, dict[str, Any]], cluster: Cluster) -> None:
    """Every manifest as a cluster would take it, or one line naming the file and what is wrong."""
    import importlib.util

    missing = [m for m in ("kubernetes_validate", "kserve", "yaml") if importlib.util.find_spec(m) is None]
    if missing:
        raise KubernetesError(f"deploy --kubernetes validates its manifests with {', '.join(missing)}: pip install "
                              "'atedm-export[kubernetes]'")
    served = {}
    for name, doc in files.items():
        if Path(name).name == "kustomization.yaml":
            _check_kustomization(name, doc, files)
        elif doc["apiVersion"].startswith("serving.kserve.io/"):
            served[name] = doc
        else:
            _check_schema(name, doc)
    _check_rules(files, cluster)
    # kserve registers its gRPC protocol's messages under the names tritonclient's take ("inference.*"): one process
    # cannot import both, so KServe's models check in a process of their own
    run_isolated(check_kserve, served, error=KubernetesError, what="KServe check")


def check_kserve(files: dict[str, dict[str, Any]]) -> None:
    """KServe's manifests as its generated models (``_kserve_model``); run in a process without tritonclient."""
    for name, doc in files.items():
        _kserve_model(doc, f"V1{doc['apiVersion'].rpartition('/')[2].removeprefix('v1')}{doc['kind']}", name)


def _check_schema(name: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path) or "(top level)"
        raise KubernetesError(f"{name}: {where}: {exc.message.splitlines()[0][:300]}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise KubernetesError(f"{name}: {exc.message}") from None


def _check_kustomization(name: str, doc: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    folder = Path(name).parent
    missing = [r for r in doc.get("resources", []) if str(folder / r) not in files and (folder / r).as_posix() not in files]
    if missing or not doc.get("resources"):
        raise KubernetesError(f"{name}: resources {missing or '(none)'} are not files of this folder")


_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _kserve_model(data: Any, type_name: str, where: str) -> Any:  # noqa: ANN401 - JSON in, a model out
    """``data`` as KServe's (or Kubernetes') generated model ``type_name``, strictly: an unknown field, a value of
    another type or a missing required one is an error (the models' own constructors check the required ones)."""
    import re

    import kserve
    from kubernetes import client

    if type_name in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[type_name]) or (type_name != "bool" and isinstance(data, bool)):
            raise KubernetesError(f"{where}: expected {type_name}, got {data!r}")
        return data
    if type_name == "object":
        return data
    if (inner := re.fullmatch(r"[lL]ist\[(.*)\]", type_name)) is not None:  # kserve's list[T], kubernetes' List[T]
        if not isinstance(data, list):
            raise KubernetesError(f"{where}: expected a list, got {data!r}")
        return [_kserve_model(item, inner.group(1), f"{where}[{i}]") for i, item in enumerate(data)]
    if (inner := re.fullmatch(r"dict\(str, (.*)\)|Dict\[str, (.*)\]", type_name)) is not None:
        if not isinstance(data, dict):
            raise KubernetesError(f"{where}: expected a mapping, got {data!r}")
        return {key: _kserve_model(value, inner.group(1) or inner.group(2), f"{where}.{key}") for key, value in data.items()}
    cls = getattr(kserve, type_name, None) or getattr(client, type_name, None)
    if cls is None:
        raise KubernetesError(f"{where}: no model {type_name} in kserve or kubernetes")
    if not isinstance(data, dict):
        raise KubernetesError(f"{where}: expected a {type_name} mapping, got {data!r}")
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], fields, 1)
        raise KubernetesError(f"{where}: unknown field '{unknown[0]}' of {type_name}"
                              + (f"; did you mean '{near[0]}'?" if near else f"; it has {len(fields)} others"))
    values = {fields[key]: _kserve_model(value, cls.openapi_types[fields[key]], f"{where}.{key}")
              for key, value in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise KubernetesError(f"{where}: {exc}") from None


def _container_ports(container: dict[str, Any]) -> set[Any]:
    ports = container.get("ports", [])
    return {p.get("name") for p in ports} | {p["containerPort"] for p in ports}


def _check_probes(where: str, holder: dict[str, Any], ports: set[Any]) -> None:
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe not in holder:
            raise KubernetesError(f"{where}: no {probe}; expected one on Triton's health endpoints")
        port = holder[probe]["httpGet"]["port"]
        if port not in ports:
            raise KubernetesError(f"{where}: {probe} port {port!r} is not a port the container opens "
                                  f"({', '.join(sorted(map(str, ports)))})")


def _check_gpus(where: str, resources: dict[str, Any], cluster: Cluster) -> None:
    asked = resources.get("limits", {}).get(GPU)
    if cluster.variant == "tensorrt" and (asked is None or int(asked) < 1):
        raise KubernetesError(f"{where}: a GPU build's server requests no {GPU}; expected a limit of "
                              f"{cluster.gpus} (the device plugin reads limits)")
    if cluster.variant != "tensorrt" and asked is not None:
        raise KubernetesError(f"{where}: the {cluster.variant} variant runs on CPUs but requests {GPU} {asked}")


def _check_rules(files: dict[str, dict[str, Any]], cluster: Cluster) -> None:
    """What the schemas cannot say: references between manifests, and what serving this repository needs."""
    deploy = files["deployment.yaml"]
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = _container_ports(container)
    _check_probes("deployment.yaml: tritonserver", container, ports)
    _check_gpus("deployment.yaml: tritonserver", container["resources"], cluster)
    labels = pod["metadata"]["labels"]
    if deploy["spec"]["selector"]["matchLabels"] != labels:
        raise KubernetesError("deployment.yaml: spec.selector does not select the pods' labels")
    svc = files["service.yaml"]["spec"]
    if svc["selector"] != labels:
        raise KubernetesError("service.yaml: spec.selector does not select the Deployment's pods")
    for port in svc["ports"]:
        if port["targetPort"] not in ports:
            raise KubernetesError(f"service.yaml: port '{port['name']}' targets {port['targetPort']!r}, which the "
                                  f"container does not open ({', '.join(sorted(map(str, ports)))})")
    if files["hpa.yaml"]["spec"]["scaleTargetRef"]["name"] != deploy["metadata"]["name"]:
        raise KubernetesError("hpa.yaml: scaleTargetRef names another Deployment")
    if files["pdb.yaml"]["spec"]["selector"]["matchLabels"] != labels:
        raise KubernetesError("pdb.yaml: spec.selector does not select the Deployment's pods")
    runtime = files["kserve/servingruntime.yaml"]
    (served,) = runtime["spec"]["containers"]
    _check_gpus("kserve/servingruntime.yaml", served["resources"], cluster)
    model = files["kserve/inferenceservice.yaml"]["spec"]["predictor"]["model"]
    if model["runtime"] != runtime["metadata"]["name"]:
        raise KubernetesError(f"kserve/inferenceservice.yaml: runtime '{model['runtime']}' is not the ServingRuntime "
                              f"written beside it ('{runtime['metadata']['name']}')")
    _check_probes("kserve/inferenceservice.yaml", model, {KSERVE_PORTS["http"]})
    _check_gpus("kserve/inferenceservice.yaml", model["resources"], cluster)


def dockerfile() -> str:
    """The server image: NGC's tritonserver (pick the release whose TensorRT built the plans) with atedm-export,
    which the router model imports."""
    return ("# docker build -t registry.example.com/atedm-tritonserver:latest --build-arg RELEASE=<release> .\n"
            "ARG RELEASE\n"
            "FROM nvcr.io/nvidia/tritonserver:${RELEASE}-py3\n"
            "RUN pip install --no-cache-dir 'atedm-export[triton]'\n")


def write_kubernetes(work: Path, cluster: Cluster, record: dict[str, Any]) -> list[str]:
    """Write the checked manifests into ``work`` (a staged folder); returns the files written."""
    import yaml

    files = manifests(cluster)
    check_manifests(files, cluster)
    for name, doc in files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (work / "Dockerfile").write_text(dockerfile())
    (work / RECORD).write_text(json.dumps({**record, "files": [*files, "Dockerfile"]}, indent=2) + "\n")
    return [*files, "Dockerfile", RECORD]
