"""Can TensorRT-RTX build an engine from a plugin-form graph on this machine? The probe behind docs/build.md.

    python tools/rtx_plugin_probe.py BUILD [--target sm89]

Takes the first plugin-form graph of BUILD (``atedm-export build ... --plugin-form``), registers a Python
``IPluginV3`` creator for each of its ``atedm`` node types (under the ``atedm`` namespace, which the ONNX parser
reads from the node's domain), and asks TensorRT-RTX's parser and builder for an engine, in a child process: a
library that aborts takes only the child with it. The plugins' build-time methods answer from the kernels' own
output table (``kernels/ops.py`` ``OUTPUTS``: shapes and dtypes); nothing here runs a kernel. Prints the parser's
and builder's log and how the child ended.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

CHILD = "--child"


def child(graph: Path, target: str) -> None:
    import onnx
    import tensorrt_rtx_bindings as trt

    from atedm_export.kernels.nodes import DOMAIN

    model = onnx.load(str(graph), load_external_data=False)
    shapes = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    node_types = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, name: str, outputs: list) -> None:
            for base in (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
                base.__init__(self)
            self.plugin_name, self.plugin_namespace, self.plugin_version = name, DOMAIN, "1"
            self.outputs, self.num_outputs = outputs, len(outputs)

        def get_capability_interface(self, kind):  # noqa: ANN001, ANN201
            return self

        def get_output_data_types(self, input_types):  # noqa: ANN001, ANN201
            return [trt.DataType.INT64 if dtype == onnx.TensorProto.INT64 else trt.DataType.FLOAT
                    for dtype, _ in self.outputs]

        def get_output_shapes(self, inputs, shape_inputs, builder):  # noqa: ANN001, ANN201
            dims = []
            for _, shape in self.outputs:
                expr = trt.DimsExprs(len(shape))
                for index, size in enumerate(shape):
                    expr[index] = builder.constant(size)
                dims.append(expr)
            return dims

        def supports_format_combination(self, pos, in_out, num_inputs):  # noqa: ANN001, ANN201
            return in_out[pos].desc.format == trt.TensorFormat.LINEAR

        def configure_plugin(self, inputs, outputs):  # noqa: ANN001, ANN201
            pass

        def on_shape_change(self, inputs, outputs):  # noqa: ANN001, ANN201
            pass

        def get_fields_to_serialize(self):  # noqa: ANN201
            return trt.PluginFieldCollection([])

        def enqueue(self, *args):  # noqa: ANN002, ANN201
            raise RuntimeError("the probe builds; it never runs an engine")

        def attach_to_context(self, context):  # noqa: ANN001, ANN201
            return self.clone()

        def set_tactic(self, tactic):  # noqa: ANN001, ANN201
            pass

        def clone(self):  # noqa: ANN201
            return Plugin(self.plugin_name, self.outputs)

    def outputs_of(node_type: str) -> list:
        node = next(n for n in model.graph.node if n.op_type == node_type and n.domain == DOMAIN)
        found = []
        for name in node.output:
            tensor = shapes[name].type.tensor_type
            found.append((tensor.elem_type, [d.dim_value for d in tensor.shape.dim]))
        return found

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self, name: str) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = name, DOMAIN, "1"
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, name, fields, phase):  # noqa: ANN001, ANN201
            print(f"probe: create_plugin {self.name} for node {name} ({phase})", flush=True)
            return Plugin(self.name, outputs_of(self.name))

    creators = [Creator(name) for name in node_types]
    registry = trt.get_plugin_registry()
    for creator in creators:
        print(f"probe: register {DOMAIN}::{creator.name}: {registry.register_creator(creator, DOMAIN)}", flush=True)

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg):  # noqa: ANN001, ANN201
            if severity <= trt.ILogger.Severity.INFO and "cudaError 35" not in msg and "plugin" in msg.lower():
                print(f"trt {severity.name}: {msg.strip()}", flush=True)

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    print(f"probe: the network API has add_plugin_v3: {hasattr(network, 'add_plugin_v3')}", flush=True)
    parser = trt.OnnxParser(network, logger)
    print("probe: parsing", flush=True)
    if not parser.parse_from_file(str(graph)):
        print("probe: parser refused:", [parser.get_error(i).desc() for i in range(parser.num_errors)], flush=True)
        return
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, target.upper()), 0)
    plan = builder.build_serialized_network(network, config)
    print(f"probe: engine {'built, ' + str(plan.nbytes) + ' bytes' if plan is not None else 'not built'}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--target", default="sm89")
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--graph", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.graph, args.target)
        return 0
    manifest = json.loads((args.build / "manifest.json").read_text())
    graphs = [g["plugin_onnx"]["path"] for s in manifest["shapes"] for g in s["stages"] if g.get("plugin_onnx")]
    if not graphs:
        print(f"error: {args.build} has no plugin form (build it with --plugin-form)", file=sys.stderr)
        return 2
    graph = args.build / graphs[0]
    print(f"probe: {graph}, target {args.target}", flush=True)
    done = subprocess.run([sys.executable, __file__, str(args.build), "--target", args.target, CHILD,
                           "--graph", str(graph)], check=False, capture_output=True, text=True)
    print(done.stdout, end="")
    print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "", flush=True)
    ended = f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"exit {done.returncode}"
    print(f"probe: the child process ended: {ended}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
