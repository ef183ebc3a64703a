"""How much of a build's stage-engine weight sections could share GPU memory page by page (no GPU needed).

    .venv/bin/python tools/plan_weights.py BUILD_DIR [--granularity-mib 2]

TensorRT-RTX's ``IWeightsManager.restore_from_vmm_allocation(handle, offset, size, stream)`` maps ranges
of an engine's weights from CUDA VMM allocations, at the VMM granularity (2 MiB). Stage engines could
share one physical copy only where their weight sections hold the same bytes at the same aligned
offsets. This reads each plan's section table (the 24-byte records after the header: a tag, offset
and size; ``THGW`` is the weights, ``NGNE`` the engine), cuts each weight section into aligned chunks
and counts the distinct ones: "copies" = distinct chunks / chunks of one plan (1.00 = one shared copy,
N = nothing shared). It assumes the weights manager's blob is the plan's weight section, which only a
GPU can confirm (docs/weights.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import struct
import sys
from pathlib import Path

SECTION = struct.Struct("<4s4xQQ")  # tag, padding, offset, size
TAGS = {b"THGW": "weights", b"NGNE": "engine"}


def sections(plan: bytes | mmap.mmap) -> dict[str, tuple[int, int]]:
    """``{"weights": (offset, size), "engine": (offset, size)}`` from the plan's header."""
    found = {}
    for start in range(0, 0x100, 8):
        tag, offset, size = SECTION.unpack_from(plan, start)
        if tag in TAGS and 0 < offset < len(plan) and offset + size <= len(plan):
            found[TAGS[tag]] = (offset, size)
    if "weights" not in found:
        raise SystemExit("plan_weights: no weight section in the plan's header (not a TensorRT-RTX 1.7 plan?)")
    return found


def chunk_hashes(data: mmap.mmap, offset: int, size: int, granularity: int) -> list[bytes]:
    """One hash per aligned chunk of ``data[offset:offset + size]``, the last one padded with zeros."""
    return [hashlib.sha256(data[i:min(i + granularity, offset + size)].ljust(granularity, b"\0")).digest()
            for i in range(offset, offset + size, granularity)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--granularity-mib", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = json.loads((args.build / "manifest.json").read_text())
    graphs = [g for shape in manifest["shapes"] for g in (shape["baseline"], *shape["stages"])]
    plans = {g["engine"]["path"]: args.build / g["engine"]["path"] for g in graphs if g.get("engine")}
    if len(plans) < 2:
        print(f"plan_weights: {args.build} has {len(plans)} engine plans; sharing needs two or more", file=sys.stderr)
        return 2
    granularity = int(args.granularity_mib * 2**20)
    rows, chunks = [], {}
    for name, path in plans.items():
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            layout = sections(data)  # a full-size plan is 5 GB: mapped, read chunk by chunk
            offset, size = layout["weights"]
            chunks[name] = chunk_hashes(data, offset, size, granularity)
            rows.append({"graph": name, "plan_bytes": len(data), "engine_bytes": layout.get("engine", (0, 0))[1],
                         "weight_bytes": size, "chunks": len(chunks[name])})
    distinct = set().union(*map(set, chunks.values()))
    everywhere = set.intersection(*map(set, chunks.values()))
    per_plan = max(len(c) for c in chunks.values())
    report = {"build": str(args.build), "granularity_bytes": granularity, "plans": rows,
              "distinct_chunks": len(distinct), "chunks_in_every_plan": len(everywhere),
              "copies": len(distinct) / per_plan, "plans_count": len(plans)}
    print(f"{'graph':10} {'plan MB':>9} {'engine MB':>10} {'weights MB':>11} {'chunks':>7}")
    for row in rows:
        print(f"{row['graph']:10} {row['plan_bytes'] / 1e6:9.2f} {row['engine_bytes'] / 1e6:10.2f} "
              f"{row['weight_bytes'] / 1e6:11.2f} {row['chunks']:7}")
    print(f"{args.granularity_mib:g} MiB chunks: {len(distinct)} distinct, {len(everywhere)} in every plan; "
          f"{report['copies']:.2f} copies of the weights for {len(plans)} engines (1.00 = fully shared)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
