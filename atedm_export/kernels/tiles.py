"""The kernels' launch configurations: the one place the launchers, the ahead-of-time compile and the graphs read
them (a tile size shapes the map kernel's per-tile column sums, which its node outputs), importable without triton."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch configuration: the one place the launchers and the ahead-of-time compile read it."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: Tile sizes per kernel, chosen by the registers ``aot.py`` reads off the sm80/sm89/sm90 cubins (no spills
#: anywhere). ``attention_lse``: 128 query rows against 64-key tiles at 8 warps (the flash-attention v2 shape for
#: head dims ≤ 128; 136 registers on sm90, 182 at 4 warps); ``head_mean_map``: 128×64 map tiles at 8 warps
#: (124 registers on sm90, two blocks an SM; 64×64 reads ``q`` and ``k`` from L2 at half the FLOPs a byte, and
#: 128×128 needs 175, one block an SM), a tile's fp32 accumulator and one head's logits in registers, the
#: tile's ``q`` and ``k`` of the next head loaded while this one computes; ``recovery_sources``: a gather, whose 64-bit
#: addresses cost two registers an element: 8 rows × 256 kept slots at 4 warps is 16 elements a thread, 48
#: registers (64×128 took 255), so enough warps are resident to hide the gather's latency.
TILES: dict[str, Tiles] = {
    "attention_lse": Tiles(block_m=128, block_n=64, num_warps=8, num_stages=3),
    "head_mean_map": Tiles(block_m=128, block_n=64, num_warps=8, num_stages=2),
    "recovery_sources": Tiles(block_m=8, block_n=256, num_warps=4, num_stages=1),
    "select": Tiles(block_m=0, block_n=0, num_warps=8, num_stages=1),  # one program per batch item, the row whole
    "gwpr_step": Tiles(block_m=64, block_n=64, num_warps=4, num_stages=2),
    "recovery_mapless": Tiles(block_m=64, block_n=64, num_warps=4, num_stages=2),
}


def row_tiles(tokens: int) -> int:
    """How many row tiles ``head_mean_map`` splits ``tokens`` rows into: the rows of its per-tile column sums."""
    return -(-tokens // TILES["head_mean_map"].block_m)
