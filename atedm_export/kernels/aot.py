"""Every map-layer kernel compiled ahead of time for a GPU target, on a machine with no GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32))`` lowers a kernel to PTX and a
cubin for any NVIDIA target; this is what CI runs for sm80, sm89 and sm90 (a kernel that cannot compile for
a GPU fails there, not on a user's machine), and what a TensorRT plugin would embed. Each kernel is compiled as
the launchers call it (``triton_kernels.TILES``, ``block_d``), at a head dim and input dtype, with the
pointer and stride divisibility the JIT itself would see for SDXL's contiguous projections; registers and
spills are read from the cubin by the ``cuobjdump`` that ships with triton, shared memory from triton's
metadata.

    python -m atedm_export.kernels.aot --target sm90 --target sm89 --target sm80 [--dtype fp16] [--json]

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
    registers: int
    spills: int
    shared_bytes: int
    ptx_bytes: int
    cubin_bytes: int


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    """Each argument's type as triton's compiler names it: pointers ``*fp16``, scalars ``fp32``/``i32``."""
    from . import triton_kernels

    fn = triton_kernels.KERNELS[kernel]
    pointers = {"attention_lse": {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Lse": "fp32"},
                "head_mean_map": {"Q": dtype, "K": dtype, "Lse": "fp32", "Map": "fp32", "ColSum": "fp32"},
                "recovery_sources": {"Map": "fp32", "Kept": "i64", "SlotOf": "i64", "Sources": "i64"},
                "select": {"Scores": "fp32", "Top": "fp32", "Kept": "i64", "SlotOf": "i64"},
                "gwpr_step": {"Q": dtype, "K": dtype, "Lse": "fp32", "Scores": "fp32", "Out": "fp32"},
                "recovery_mapless": {"Q": dtype, "K": dtype, "Lse": "fp32", "Kept": "i64", "SlotOf": "i64",
                                     "Sources": "i64"}}[kernel]
    signature = {}
    for name in fn.arg_names:
        if name in pointers:
            signature[name] = f"*{pointers[name]}"
        elif name == "scale":
            signature[name] = "fp32"
        elif name.isupper() and name not in ("N", "M", "H", "D", "KEEP"):
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    return signature


def _constexprs(kernel: str, dtype: str, head_dim: int) -> dict[str, object]:
    from . import triton_kernels

    tiles = triton_kernels.TILES[kernel]
    if kernel == "recovery_sources":
        return {"BLOCK_M": tiles.block_m, "BLOCK_K": tiles.block_n}
    if kernel == "select":  # compiled for SDXL's finest blocks at 1024² (the row whole in one program)
        return {"BLOCK": 4096}
    second = "BLOCK_K" if kernel == "recovery_mapless" else "BLOCK_N"
    return {"BLOCK_M": tiles.block_m, second: tiles.block_n, "BLOCK_D": triton_kernels.block_d(head_dim),
            "PRECISION": "ieee" if dtype == "fp32" else "tf32"}


def _attrs(signature: dict[str, str]) -> dict[tuple[int, ...], list[list[object]]]:
    """Divisibility by 16 of every pointer and stride (SDXL's projections are contiguous, channels a multiple of 16)."""
    names = list(signature)
    aligned = [i for i, n in enumerate(names) if signature[n].startswith("*") or n.startswith("stride_")]
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def _resources(cubin: bytes, name: str) -> tuple[int, int]:
    """Registers and spilled bytes of ``name`` in ``cubin``, from ``cuobjdump -res-usage``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return int(registers.group(1)) if registers else -1, int(local.group(1)) if local else 0


def compile_kernel(kernel: str, target: str, dtype: str = "fp16", head_dim: int = 64) -> tuple[Compiled, dict[str, bytes | str]]:
    """One kernel for ``target`` (``sm90``…): its resource use, and its ``ptx`` and ``cubin``."""
    if interpreting():
        raise AtedmError("TRITON_INTERPRET is set: the kernels are interpreted and cannot be compiled; unset it")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels

    if not re.fullmatch(r"sm\d{2,3}", target):
        raise AtedmError(f"unknown target '{target}'; expected sm<capability>, e.g. sm90")
    tiles = triton_kernels.TILES[kernel]
    signature = _signature(kernel, DTYPES[dtype])
    source = ASTSource(triton_kernels.KERNELS[kernel], signature, _constexprs(kernel, dtype, head_dim), _attrs(signature))
    compiled = triton.compile(source, target=GPUTarget("cuda", int(target[2:]), 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    registers, spills = _resources(compiled.asm["cubin"], kernel)
    info = Compiled(kernel, target, dtype, head_dim, registers, spills, int(compiled.metadata.shared),
                    len(compiled.asm["ptx"]), len(compiled.asm["cubin"]))
    return info, {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"]}


def compile_all(targets: tuple[str, ...] = TARGETS, dtype: str = "fp16", head_dim: int = 64) -> list[Compiled]:
    from . import triton_kernels

    return [compile_kernel(kernel, target, dtype, head_dim)[0] for target in targets for kernel in triton_kernels.KERNELS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the map layer's Triton kernels ahead of time for GPU targets.")
    parser.add_argument("--target", action="append", help=f"sm<capability> (repeatable) [default: {', '.join(TARGETS)}]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows = compile_all(tuple(args.target or TARGETS), args.dtype, args.head_dim)
    except AtedmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    print(f"{'kernel':<18} {'target':<6} {'dtype':<5} {'d':>4} {'registers':>9} {'spills':>6} {'shared B':>9} {'cubin B':>8}")
    for r in rows:
        print(f"{r.kernel:<18} {r.target:<6} {r.dtype:<5} {r.head_dim:>4} {r.registers:>9} {r.spills:>6} "
              f"{r.shared_bytes:>9} {r.cubin_bytes:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
