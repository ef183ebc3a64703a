"""Every map-layer kernel compiled ahead of time for a GPU target, on a machine with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))`` lowers a kernel to PTX and a
cubin for any NVIDIA target; this is what CI runs for sm80, sm89 and sm90 (a kernel that cannot compile for
a GPU fails there, not on a user's machine), and what a TensorRT plugin embeds (``compile/plugins.py``). Each op's
entry kernel is compiled as it is launched (``triton_kernels.LAUNCHES``), at a head dim and input dtype, with the
pointer and size divisibility the JIT itself would see for SDXL's contiguous projections; registers and
spills are read from the cubin by the ``cuobjdump`` that ships with triton, shared memory from triton's
metadata.

    python -m atedm_export.kernels.aot --target sm90 --target sm89 --target sm80 [--dtype fp16] [--tokens N] [--json]

Run it with ``TRITON_INTERPRET`` unset: under the interpreter the kernels are not compilable objects.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AtedmError
from .runnable import interpreting

TARGETS = ("sm80", "sm89", "sm90")
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    target: str
    dtype: str
    head_dim: int
    tokens: int
    registers: int
    spills: int
    shared_bytes: int
    ptx_bytes: int
    cubin_bytes: int


#: Each pointer argument's element type, by name (``name@op`` where one op differs), where it is not the projections'.
_POINTERS = {"Lse": "fp32", "Map": "fp32", "ColSum": "fp32", "Scores": "fp32", "Kept": "i64",
             "SlotOf": "i64", "Sources": "i64", "Out@gwpr_step": "fp32"}


def _signature(name: str, dtype: str) -> dict[str, str]:
    """Each argument of the op's entry kernel as triton's compiler names it: pointers ``*fp16``, sizes ``i32``,
    constants ``constexpr``."""
    from . import triton_kernels

    spec = triton_kernels.LAUNCHES[name]
    signature = {}
    for arg in spec.kernel.arg_names:
        if arg in spec.sizes:
            signature[arg] = "i32"
        elif arg in ("SCALE", "PRECISION") or arg.startswith("BLOCK"):
            signature[arg] = "constexpr"
        else:
            signature[arg] = "*" + _POINTERS.get(f"{arg}@{name}", _POINTERS.get(arg, dtype))
    return signature


def _attrs(signature: dict[str, str], sizes: dict[str, int]) -> dict[tuple[int, ...], list[list[object]]]:
    """Divisibility by 16 of every pointer (TensorRT and torch allocate 256-byte aligned) and of each size that is a
    multiple of 16 at the shape compiled for, as triton's JIT specializes them: the strides computed from them keep
    the loads vectorized."""
    names = list(signature)
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or
               (signature[n] == "i32" and sizes.get(n, 1) % 16 == 0)]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


#: The sizes ``python -m atedm_export.kernels.aot`` compiles at: SDXL's finest blocks at 1024², 37% kept (the
#: selection's tile is the row whole); the head dim is the command's, and ``--tokens`` another block's size.
SDXL_SIZES = {"B": 2, "N": 4096, "M": 4096, "H": 10, "KEEP": 1516}


def block_sizes(tokens: int, head_dim: int) -> dict[str, int]:
    """``SDXL_SIZES`` for a block of ``tokens`` tokens (37% kept, as SDXL's main stage)."""
    return {**SDXL_SIZES, "N": tokens, "M": tokens, "KEEP": round(0.37 * tokens), "D": head_dim}


def _resources(cubin: bytes, name: str) -> tuple[int, int]:
    """Registers and spilled bytes (its stack frame and local memory) of ``name`` in ``cubin``, from ``cuobjdump
    -res-usage``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    spilled = sum(int(found.group(1)) for found in (re.search(rf"{kind}:(\d+)", text) for kind in ("STACK", "LOCAL"))
                  if found)  # ptxas puts spilled registers in the stack frame, which cuobjdump reports as STACK
    return int(registers.group(1)) if registers else -1, spilled


def compile_node(name: str, target: str, dtype: str, sizes: dict[str, int], scale: float | None = 0.125):  # noqa: ANN201
    """Op ``name``'s entry kernel compiled for ``target`` (``sm90``…) at ``sizes``: triton's compiled kernel (its
    ``asm["ptx"]``, ``asm["cubin"]``, ``metadata``). What a TensorRT plugin embeds, and what ``compile_all`` reports."""
    if interpreting():
        raise AtedmError("TRITON_INTERPRET is set: the kernels are interpreted and cannot be compiled; unset it")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels

    if not re.fullmatch(r"sm\d{2,3}", target):
        raise AtedmError(f"unknown target '{target}'; expected sm<capability>, e.g. sm90")
    spec = triton_kernels.LAUNCHES[name]
    signature = _signature(name, DTYPES[dtype])
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    constexprs = spec.constexprs(sizes, torch_dtype, scale if "scale" in spec.scalars else None)
    source = ASTSource(spec.kernel, signature, constexprs, _attrs(signature, sizes))
    return triton.compile(source, target=GPUTarget("cuda", int(target[2:]), 32),
                          options={"num_warps": spec.tiles.num_warps, "num_stages": spec.tiles.num_stages})


def compile_kernel(name: str, target: str, dtype: str = "fp16", head_dim: int = 64,
                   tokens: int = SDXL_SIZES["N"]) -> tuple[Compiled, dict[str, bytes | str]]:
    """One op's entry kernel for ``target`` at ``block_sizes``: its resource use, and its ``ptx`` and ``cubin``."""
    compiled = compile_node(name, target, dtype, block_sizes(tokens, head_dim))
    registers, spills = _resources(compiled.asm["cubin"], name)
    info = Compiled(name, target, dtype, head_dim, tokens, registers, spills, int(compiled.metadata.shared),
                    len(compiled.asm["ptx"]), len(compiled.asm["cubin"]))
    return info, {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"]}


def compile_all(targets: tuple[str, ...] = TARGETS, dtype: str = "fp16", head_dim: int = 64,
                tokens: int = SDXL_SIZES["N"]) -> list[Compiled]:
    from . import triton_kernels

    return [compile_kernel(name, target, dtype, head_dim, tokens)[0]
            for target in targets for name in triton_kernels.LAUNCHES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the map layer's Triton kernels ahead of time for GPU targets.")
    parser.add_argument("--target", action="append", help=f"sm<capability> (repeatable) [default: {', '.join(TARGETS)}]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=SDXL_SIZES["N"],
                        help="a block's tokens, 37%% of them kept [default: 4096, SDXL's 64x64 blocks at 1024²]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.tokens < 1:
            raise AtedmError(f"--tokens must be a positive count, got {args.tokens}")
        rows = compile_all(tuple(args.target or TARGETS), args.dtype, args.head_dim, args.tokens)
    except AtedmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'kernel':<18} {'target':<6} {'dtype':<5} {'d':>4} {'tokens':>6} {'registers':>9} {'spills':>6} "
          f"{'shared B':>9} {'cubin B':>8}")
    for r in rows:
        print(f"{r.kernel:<18} {r.target:<6} {r.dtype:<5} {r.head_dim:>4} {r.tokens:>6} {r.registers:>9} {r.spills:>6} "
              f"{r.shared_bytes:>9} {r.cubin_bytes:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
