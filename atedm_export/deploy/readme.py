"""The README written into every deployed repository: how to start the server and how to call it."""

from __future__ import annotations

from ..buildfolder import Manifest, first_view, views
from .config import router_tensors
from .routing import STAGE_OUTPUT
from .server import SHELL_CONTROL


def _dims(dims: list[int]) -> str:
    """A router tensor's dims per request: ``[b, 4, 128, 128]``; a latent height or width the shapes differ in
    (``-1`` in the config) as ``h`` or ``w``."""
    named = [str(d) if d != -1 else ("h", "w")[i - len(dims) + 2] if i >= len(dims) - 2 else "n"
             for i, d in enumerate(dims)]
    return f"`[b, {', '.join(named)}]`"


def _io_table(manifest: Manifest, max_batch: int) -> str:
    inputs, outputs = router_tensors(manifest)
    rows = ["| tensor | type | shape per request |", "|---|---|---|"]
    for direction, tensors in (("in", inputs), ("out", outputs)):
        for name, precision, dims in tensors:
            note = ": index of the DSAP stage that ran" if name == STAGE_OUTPUT else ""
            rows.append(f"| `{name}` ({direction}) | {precision.wire} | {_dims(dims)}{note} |")
    text = "\n".join(rows) + f"\n\n`b` is 1 to {max_batch} rows (one latent each; a classifier-free-guidance pair is 2)."
    if any(-1 in dims for _, _, dims in inputs):
        text += ("\n`h`, `w`: a latent height, a width (pixels / 8) the build's shapes differ in: the router's "
                 "config takes any\nvalue there, and the router refuses a shape the build lacks with one line "
                 "naming its shapes.")
    return text


def _models(record: dict, manifest: Manifest) -> str:
    """The graph models: a list, or for a multi-shape build a table by shape with what a request of each looks like."""
    if not manifest.multi_shape:
        return "\n".join(f"- `{model}`: graph `{info['graph']}`" for model, info in record["models"].items() if info["graph"])
    models = {info["graph"]: model for model, info in record["models"].items() if info["graph"]}
    rows = ["| shape | `sample` of a full request | graph models |", "|---|---|---|"]
    for view in views(manifest):
        served = ", ".join(f"`{models[view.graph_id(e.name)]}`" for e in view.graphs() if not e.same_as)
        rows.append(f"| `{view.shape.key}` ({view.shape}) | `{view.inputs[0].shape}` | {served} |")
    return f"""
Shapes: one graph model per shape and graph. The router reads each request's shape from its `sample`
(rows, latent height and width). `b` rows at a latent size the build has run the shape of `b` rows there;
where there is none, the shape of the next larger batch at that size (the rows padded), else of the largest
(in chunks). A latent size the build lacks is refused with one line naming the shapes it has.

{chr(10).join(rows)}"""


def _stages(manifest: Manifest) -> str:
    view = first_view(manifest)
    spec = view.graph_spec
    lines = []
    for s in view.stages:
        steps = f"steps {s.steps[0]}-{s.steps[1] - 1}" if s.step_count else "no steps"
        lines.append(f"- `{s.name}`: up to {s.until:g} of the steps ({steps} of a {spec.steps}-step run), "
                     f"graph `{s.same_as or s.name}`")
    return "\n".join(lines)


def _start(record: dict, manifest: Manifest) -> str:
    if record["variant"] == "tensorrt":
        engine = record["engine"]
        return f"""A GPU server (the NGC Triton container). The plans were built with {engine['library']} {engine['version']}:
use the Triton release whose TensorRT is that version (Triton's release notes list it), on the GPU the
engines were built on. The router model needs atedm-export and torch in the container's Python:

```bash
docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -v "$PWD":/models:ro -v /path/to/atedm-export:/src \\
  nvcr.io/nvidia/tritonserver:<release>-py3 \\
  bash -c "pip install /src && tritonserver --model-repository /models {SHELL_CONTROL}"
```

`{SHELL_CONTROL}` lets the router reload a stage model whose process died (an
out-of-memory kill): requests to that stage wait for it instead of failing for good. The repository is
mounted read-only: serving never needs to write into it."""
    return """A CPU server. In the environment where atedm-export is installed (`bash tools/setup.sh` unpacks a
`tritonserver` with the Python backend into `.venv/triton`):

```bash
atedm-export serve .            # loopback, HTTP 8000 and gRPC 8001; Ctrl-C stops it
```

Or with any `tritonserver` that has the Python backend, its stub started from that environment's
`python3` (first on `PATH`), and that interpreter's `libpython` first on `LD_LIBRARY_PATH`:

```bash
PYTHONDONTWRITEBYTECODE=1 tritonserver --model-repository . {control}
```

`{control}` lets the router reload a stage model whose process died (an
out-of-memory kill); `PYTHONDONTWRITEBYTECODE=1` keeps Python from writing `__pycache__` folders into the
model folders. `serve` passes both.""".format(control=SHELL_CONTROL)


def repository_readme(record: dict, manifest: Manifest) -> str:
    view = first_view(manifest)
    spec = view.graph_spec
    router = record["router"]
    if manifest.multi_shape:
        size = f"at {len(manifest.shapes)} shapes ({', '.join(s.key for s in manifest.shape_list)})"
        batches = "static batches\n  of the request's shape"
        first = (f"\n`generate` draws at the build's first shape, {view.shape.key}, unless `--width`, "
                 "`--height` or `--batch`\npick another; the UNet `connect` gives runs each call at its `sample`'s "
                 "shape.\n")
    else:
        size, first = f"at {spec.width}x{spec.height}", ""
        batches = f"static batches of {view.inputs[0].shape[0]} rows"
    return f"""# Triton model repository: {spec.name}

Written by atedm-export {record['atedm_export']} from `{record['build']}` ({record['variant']} variant),
{record['created']}. {spec.model} {size}, {spec.precision}, schedule `{spec.dsap.name}`.
`atedm-deploy.json` lists every file with its sha256, and marks what `atedm-export deploy` wrote here:
`deploy --force` replaces that and nothing else in the folder.

## Models

- `{router}`: the UNet to call. It routes each row to the graph of the DSAP stage its step falls in
  (a stage ends at `round(until × num_steps)`) and calls that graph's model (BLS), in {batches};
  it batches requests dynamically.
{_models(record, manifest)}

Stages:
{_stages(manifest)}

## Start the server

The commands run in the repository folder (the one holding `atedm-deploy.json`).

{_start(record, manifest)}

## Call it

```bash
atedm-export generate --triton http://127.0.0.1:8000 -p "a red fox" -o fox.png   # or grpc://127.0.0.1:8001
atedm-export load-test http://127.0.0.1:8000 --requests 200 --concurrency 16     # p50/p99 latency, errors
```
{first}
From Python, the served UNet is a drop-in for `pipe.unet`:

```python
from atedm_export.deploy.client import connect
unet = connect("http://127.0.0.1:8000", model="{router}")   # reads the build's manifest from the server
unet.attach(pipe)                                             # pipe.unet = unet, following pipe.scheduler
```

`{router}` inputs and outputs (any Triton client):

{_io_table(manifest, record['max_batch'])}

## Versions

{_versions(record)} A new build of this model (a refit, a new schedule; the same shapes) goes in beside the
serving one, and running servers move to it without refusing a request:

```bash
atedm-export deploy NEW_BUILD --triton . --next-version     # the next version of every model
atedm-export rollout . --url http://127.0.0.1:8000          # each server in turn (repeat --url), then the old versions go
```
"""


def _versions(record: dict) -> str:
    """What the record says of the repository's versions, one sentence each."""
    lines = [f"Version {v}: `{info['build']}` ({info['created']})." for v, info in
             sorted(record["versions"].items(), key=lambda item: int(item[0]))]
    serving = (f" The router loads only its newest, {record['version']}; run `atedm-export rollout` to move running "
               "servers to it and retire the others." if len(lines) > 1 else "")
    return " ".join(lines) + serving
