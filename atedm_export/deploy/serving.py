"""The Triton Python-backend models of a deployed repository (each ``model.py`` imports one of these).

``RouterModel`` is the UNet clients call: it picks the build's shape from each request's ``sample``, routes
each row to the graph of its DSAP stage at that shape, and calls that graph's model through BLS.
``OnnxRuntimeStageModel`` serves one graph (of one shape) with the project's own onnxruntime backend, for CPU
servers; on GPU servers each graph is a ``tensorrt_plan`` model instead.

Every version of the router is one build (``deploy --next-version`` adds one, ``rollout`` moves servers to it):
its manifest lives in its own version folder (``<router>/<version>/build/``), and it calls its graph models at
that same version, so one request never mixes two builds however the versions are loaded.

A request the model refuses (a shape the build lacks, a step outside the run, a NaN or infinite input) is
answered with Triton's
invalid-argument code, which HTTP clients see as 400: the caller sent it and can fix it. A model that
fails on a good request answers with the internal code (HTTP 500): that is the server's fault.

Tensors cross the Python backend by DLPack only: its NumPy path (``as_numpy``, ``Tensor(name, array)``)
was seen here to hand models garbage inputs and send empty outputs when the model's environment has
NumPy 2, while DLPack is exact with any NumPy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils import dlpack

from ..errors import AtedmError, first_line
from ..contract import precision_of
from ..buildfolder import ShapeError, ShapeView, read_manifest, check_graph, view_at
from ..runtime.backends import OnnxRuntimeBackend
from ..shapes import Shape
from .layout import BUILD_FOLDER
from .routing import STAGE_OUTPUT, STEP_INPUTS, Router, RoutingError, graph_model_name
from .server import SHELL_CONTROL

#: On the router: the newest version's manifest (JSON), for clients (``connect``); each version routes by its own.
MANIFEST_PARAMETER = "atedm_manifest"
GRAPH_PARAMETER = "atedm_graph"  # on a stage model: the graph it serves
SHAPE_PARAMETER = "atedm_shape"  # on a stage model: the shape of that graph (shapes.Shape, JSON)
#: On an onnxruntime stage model: the build folder its version serves, from the repository, ``{version}`` its version.
BUILD_PARAMETER = "atedm_build"
#: What Triton's Python backend answers for a model whose process died (killed, out of memory): for good,
#: while the model still reports ready. The router reloads such a model and retries once.
DEAD_MODEL = "is not healthy"


class RequestError(AtedmError):
    """A request the model cannot serve as sent: the client's error, answered as invalid argument (HTTP 400)."""


def check_finite(feed: dict[str, torch.Tensor]) -> None:
    """Refuse NaN and infinite floating-point inputs: the graphs would turn them into a NaN latent, served as
    if fine. One pass over the inputs, small beside the UNet call they would feed."""
    for name, tensor in feed.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RequestError(f"input '{name}' holds NaN or infinite values; expected finite numbers")


class _PythonModel:
    """What both models share: the backend utilities, the config's parameters, the version folder."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only exists inside the server

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.parameters = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.name = args["model_name"]
        self.version = int(args["model_version"])
        self.version_dir = Path(args["model_repository"]) / args["model_version"]

    def tensor_in(self, request: Any, name: str) -> torch.Tensor:
        """An input of a request as a torch tensor (zero-copy); a missing one is the client's error."""
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise RequestError(f"no tensor '{name}' in the request")
        return dlpack.from_dlpack(tensor.to_dlpack())

    def tensor_of(self, response: Any, name: str) -> torch.Tensor:
        """An output of a BLS response as a torch tensor (zero-copy); a missing one is the server's error."""
        tensor = self.pb.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise AtedmError(f"no tensor '{name}' in the response")
        return dlpack.from_dlpack(tensor.to_dlpack())

    def read_inputs(self, request: Any, names: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """A request's inputs, checked: what is wrong with them is the client's error (``RequestError``)."""
        feed = {name: self.tensor_in(request, name) for name in names}
        check_finite(feed)
        return feed

    def tensor_out(self, name: str, value: torch.Tensor) -> Any:
        return self.pb.Tensor.from_dlpack(name, dlpack.to_dlpack(value.contiguous()))

    def error_response(self, error: AtedmError) -> Any:
        """The response for a failed request: invalid argument (HTTP 400) for a ``RequestError``, else internal (500)."""
        code = self.pb.TritonError.INVALID_ARG if isinstance(error, RequestError) else self.pb.TritonError.INTERNAL
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(error), code))


class RouterModel(_PythonModel):
    """``sample, timestep, encoder_hidden_states, text_embeds, time_ids, step, num_steps`` → ``latent, stage``.

    Each request runs at the build's shape its ``sample`` has (``Router.view_for``); requests Triton batched
    together may be of different shapes.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self.router = Router(read_manifest(self.version_dir / BUILD_FOLDER, verify=False))
        self.first = self.router.first  # the I/O names every shape shares

    def read(self, request: Any) -> tuple[dict[str, torch.Tensor], ShapeView, list[tuple[int, str]]]:
        """A request's tensors (timestep, step and step count flattened to one value per row), its shape and routes.

        Raises ``RequestError`` for what the client sent wrong: a non-finite input, a shape the build lacks, a
        step outside the run.
        """
        feed = self.read_inputs(request, (*self.first.input_names, *STEP_INPUTS))
        sample = feed["sample"]
        rows = sample.shape[0]
        for name in ("timestep", *STEP_INPUTS):
            feed[name] = feed[name].reshape(rows)
        try:
            view = self.router.view_for(rows, int(sample.shape[-2]), int(sample.shape[-1]))
            routes = [self.router.route(int(s), int(n), view)
                      for s, n in zip(feed["step"].tolist(), feed["num_steps"].tolist())]
        except (RoutingError, ShapeError) as exc:
            raise RequestError(str(exc)) from None
        return feed, view, routes

    def call_graph(self, graph: str, feed: dict[str, torch.Tensor]) -> torch.Tensor:
        """One BLS call to the model serving ``graph``, at this router's version; its output comes back in CPU memory.

        A model whose process died is reloaded and the call retried once, so a killed stage costs the
        calls that were in flight, not every later one.
        """
        model = graph_model_name(self.name, graph)
        response = self._exec(model, feed)
        if response.has_error() and DEAD_MODEL in response.error().message():
            self._reload(model)
            response = self._exec(model, feed)
        if response.has_error():
            raise AtedmError(f"model '{model}' failed: {response.error().message()}")
        return self.tensor_of(response, self.first.output_name)

    def _exec(self, model: str, feed: dict[str, torch.Tensor]) -> Any:
        request = self.pb.InferenceRequest(
            model_name=model, model_version=self.version, requested_output_names=[self.first.output_name],
            inputs=[self.tensor_out(name, feed[name]) for name in self.first.input_names],
            preferred_memory=self.pb.PreferredMemory(self.pb.TRITONSERVER_MEMORY_CPU, 0),
        )
        return request.exec()

    def _reload(self, model: str) -> None:
        """Unload ``model`` and load it again: Triton starts fresh instances, and reports the model not ready
        meanwhile. A load alone would do nothing: Triton reloads only versions whose files changed."""
        try:
            self.pb.unload_model(model_name=model)
            self.pb.load_model(model_name=model)
        except Exception as exc:  # noqa: BLE001 - pb_utils raises its own TritonModelException
            raise AtedmError(f"model '{model}' died and could not be reloaded ({first_line(exc)}); start the server "
                             f"with {SHELL_CONTROL} so the router can reload it") from None

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds: list[dict[str, torch.Tensor]] = []
        views: list[ShapeView] = []
        routes: list[list[tuple[int, str]]] = []
        errors: dict[int, AtedmError] = {}
        for i, request in enumerate(requests):
            try:
                feed, view, route = self.read(request)
            except AtedmError as exc:
                feed, view, route, errors[i] = {}, self.first, [], exc
            feeds.append(feed)
            views.append(view)
            routes.append(route)
        outputs = []
        for view, route in zip(views, routes):
            output = view.outputs[0]
            outputs.append(torch.empty((len(route), *output.shape[1:]), dtype=precision_of(output.dtype).torch))
        for chunk in self.router.plan([[name for _, name in r] for r in routes], views):
            try:
                self.router.scatter(chunk, self.call_graph(chunk.graph, self.router.gather(chunk, feeds)), outputs)
            except AtedmError as exc:  # the graph model failed: the server's error
                for request, _ in chunk.rows:
                    errors.setdefault(request, exc)
        responses = []
        for i, route in enumerate(routes):
            if i in errors:
                responses.append(self.error_response(errors[i]))
                continue
            stages = torch.tensor([[index] for index, _ in route], dtype=torch.int32)
            responses.append(self.pb.InferenceResponse(
                output_tensors=[self.tensor_out(self.first.output_name, outputs[i]),
                                self.tensor_out(STAGE_OUTPUT, stages)]
            ))
        return responses


class OnnxRuntimeStageModel(_PythonModel):
    """One graph of the build, at one of its shapes, on the project's onnxruntime backend (CPU), its files checked at
    load.

    The graph models of a repository share one build folder (the router's ``build/``): one copy of the
    weights on disk, mapped by every model's session, so the server's processes share its pages.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        build = Path(args["model_repository"]).parent / self.parameters[BUILD_PARAMETER].format(version=self.version)
        shape = Shape.model_validate_json(self.parameters[SHAPE_PARAMETER])
        self.view = view_at(read_manifest(build, verify=False), shape)
        self.graph = self.parameters[GRAPH_PARAMETER]
        entry = self.view.graph(self.graph)
        check_graph(self.view.manifest, build, entry, engine=False)
        self.backend = OnnxRuntimeBackend(build, self.view, "cpu")
        self.backend.session(entry)  # load now: a broken graph fails the model load, not the first request

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                feed = self.read_inputs(request, self.view.input_names)
                latent = self.backend.run(self.graph, feed)
                output = self.tensor_out(self.view.output_name, latent)
                responses.append(self.pb.InferenceResponse(output_tensors=[output]))
            except AtedmError as exc:
                responses.append(self.error_response(exc))
        return responses
