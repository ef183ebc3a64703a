"""The README written into every deployed repository: how to start the server and how to call it."""

from __future__ import annotations

from ..manifest import Manifest
from ..contract import precision_of
from .routing import STAGE_OUTPUT, STEP_INPUTS
from .server import SHELL_CONTROL


def _io_table(manifest: Manifest, max_batch: int) -> str:
    rows = ["| tensor | type | shape per request |", "|---|---|---|"]
    for t in manifest.inputs:
        rows.append(f"| `{t.name}` (in) | {precision_of(t.dtype).wire} | `[b, {', '.join(map(str, t.shape[1:] or [1]))}]` |")
    for name in STEP_INPUTS:
        rows.append(f"| `{name}` (in) | INT32 | `[b, 1]` |")
    out = manifest.outputs[0]
    rows.append(f"| `{out.name}` (out) | {precision_of(out.dtype).wire} | `[b, {', '.join(map(str, out.shape[1:]))}]` |")
    rows.append(f"| `{STAGE_OUTPUT}` (out) | INT32 | `[b, 1]`: index of the DSAP stage that ran |")
    return "\n".join(rows) + f"\n\n`b` is 1 to {max_batch} rows (one latent each; a classifier-free-guidance pair is 2)."


def _start(record: dict, manifest: Manifest) -> str:
    if record["backend"] == "tensorrt":
        engine = record["engine"]
        return f"""A GPU server (the NGC Triton container). The plans were built with {engine['backend']} {engine['version']}:
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
    spec = manifest.graph_spec
    router = record["router"]
    graphs = "\n".join(f"- `{model}`: graph `{info['graph']}`" for model, info in record["models"].items() if info["graph"])
    stages = "\n".join(f"- `{s.name}`: up to {s.until:g} of the steps (steps {s.steps[0]}-{s.steps[1] - 1} of a "
                       f"{spec.steps}-step run), graph `{s.same_as or s.name}`" for s in manifest.stages)
    return f"""# Triton model repository: {spec.name}

Written by atedm-export {record['atedm_export']} from `{record['build']}` ({record['backend']} variant),
{record['created']}. {spec.model} at {spec.width}x{spec.height}, {spec.precision}, schedule `{spec.dsap.name}`.
`atedm-deploy.json` lists every file with its sha256, and marks what `atedm-export deploy` wrote here:
`deploy --force` replaces that and nothing else in the folder.

## Models

- `{router}`: the UNet to call. It routes each row to the graph of the DSAP stage its step falls in
  (a stage ends at `round(until × num_steps)`) and calls that graph's model (BLS), in static batches of
  {manifest.inputs[0].shape[0]} rows; it batches requests dynamically.
{graphs}

Stages:
{stages}

## Start the server

The commands run in the repository folder (the one holding `atedm-deploy.json`).

{_start(record, manifest)}

## Call it

```bash
atedm-export generate --triton http://127.0.0.1:8000 -p "a red fox" -o fox.png   # or grpc://127.0.0.1:8001
atedm-export load-test http://127.0.0.1:8000 --requests 200 --concurrency 16     # p50/p99 latency, errors
```

From Python, the served UNet is a drop-in for `pipe.unet`:

```python
from atedm_export.deploy.client import connect
unet = connect("http://127.0.0.1:8000", model="{router}")   # reads the build's manifest from the server
unet.attach(pipe)                                             # pipe.unet = unet, following pipe.scheduler
```

`{router}` inputs and outputs (any Triton client):

{_io_table(manifest, record['max_batch'])}
"""
