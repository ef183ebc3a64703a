"""The map layer's Triton kernels: one source for CUDA (any target, compiled ahead of time by ``aot.py``) and
for Triton's interpreter (``TRITON_INTERPRET=1``), which runs them on CPU tensors in the tests.

Three kernels, each one pass over what it reads, fp16/bf16 inputs into fp32 accumulators (a tensor-core
``dot`` with an fp32 accumulator gives the fp32 GEMM's logits; fp32 inputs run as IEEE fp32, never TF32):

* ``attention_lse``: the layer's output and each head's log-sum-exp, flash style (online softmax over key
  tiles), so no probability ever goes through memory;
* ``head_mean_map``: ``A[b, i, j] = mean_h exp(q_ih·k_jh·scale − lse_ih)``, one ``[BLOCK_M, BLOCK_N]`` tile
  of ``A`` per program with the heads summed in registers (never a per-head map in memory), written once,
  and each tile's column sums beside it: G-WPR's first step ``s₁ = (1/N)·1ᵀA`` without a second pass;
* ``recovery_sources``: ``argmax_{slot} A[i, kept[slot]]`` (the first maximal slot, as ``torch.argmax``),
  one pass over the kept columns of each row.

And the same layer with no map in memory, for blocks whose map would not fit (``ops.MAP_BYTES_LIMIT``): a
G-WPR step ``s'_j = mean_h Σ_i s_i·exp(q_ih·k_jh·scale − lse_ih)`` is an attention with the roles of queries
and keys swapped (``gwpr_step``, one pass over ``q`` and ``k`` per step), and recovery computes each tile of
``A[i, kept]`` from ``q``, ``k`` and lse (``recovery_mapless``). The map's pass costs one ``q·kᵀ`` per head;
this form pays one per G-WPR step, for no ``N²`` bytes.

Column sums are written per row tile and added by the caller (``[B, tiles, M]`` → ``[B, M]``), not with
atomics: the sum's order is then fixed, so the same input keeps the same tokens on every run.
Offsets are computed in int64 where a product of sizes can pass 2³¹ (a 2048² block's map holds 2.7·10⁸
floats per image).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .outputs import allocate
from .tiles import TILES, Tiles

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e): the kernels work in base 2, as flash kernels do
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _batch_and_head(bh, H):
    """A ``batch·heads`` program index as (batch, head), in int64 for the offsets they scale."""
    return (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _span(start, BLOCK: tl.constexpr, limit):
    """The indices ``start … start + BLOCK − 1`` of one tile and which of them lie below ``limit``."""
    index = start + tl.arange(0, BLOCK)
    return index, index < limit


@triton.jit
def _head_rows(base, index, index_ok, stride_index, dims, dim_ok):
    """The ``[len(index), BLOCK_D]`` tile of one head's rows ``index`` at ``base`` (masked rows and dims read 0)."""
    return tl.load(base + index[:, None] * stride_index + dims[None, :], mask=index_ok[:, None] & dim_ok[None, :],
                   other=0.0)


@triton.jit
def attention_lse_kernel(
    Q, K, V, Out, Lse, scale,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_km, stride_kh, stride_vb, stride_vm, stride_vh,
    stride_ob, stride_on, stride_oh,
    N, M, H, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (row tile, batch·head): ``out = softmax(q·kᵀ·scale)·v`` and ``lse = log Σ_j exp(q·k_j·scale)``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_and_head(bh, H)
    rows, row_ok = _span(pid_m * BLOCK_M, BLOCK_M, N)
    dims, dim_ok = _span(0, BLOCK_D, D)
    q = _head_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qn, dims, dim_ok)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, M, BLOCK_N):
        cols, col_ok = _span(start, BLOCK_N, M)
        k = _head_rows(k_base, cols, col_ok, stride_km, dims, dim_ok)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _head_rows(v_base, cols, col_ok, stride_vm, dims, dim_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :],
             acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    lse = m_i * LN2 + tl.log(l_i)
    tl.store(Lse + (b * H + h) * N + rows, lse, mask=row_ok)


@triton.jit
def head_mean_map_kernel(
    Q, K, Lse, Map, ColSum, scale,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_km, stride_kh,
    N, M, H, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of the head-mean map, and its column sums over N into ``ColSum[b, row tile]``:
    the row tiles' sums add up to G-WPR's first step from the uniform ``1/N``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, row_ok = _span(pid_m * BLOCK_M, BLOCK_M, N)
    cols, col_ok = _span(pid_n * BLOCK_N, BLOCK_N, M)
    dims, dim_ok = _span(0, BLOCK_D, D)
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for h in range(H):
        q = _head_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qn, dims, dim_ok)
        k = _head_rows(K + b * stride_kb + h * stride_kh, cols, col_ok, stride_km, dims, dim_ok)
        lse = tl.load(Lse + (b * H + h) * N + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        acc += tl.exp2(s - (lse * LOG2E)[:, None])
    acc = acc / H
    acc = tl.where(row_ok[:, None] & col_ok[None, :], acc, 0.0)
    tl.store(Map + (b * N + rows[:, None]) * M + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(ColSum + (b * tl.num_programs(0) + pid_m) * M + cols, tl.sum(acc, 0) / N, mask=col_ok)


@triton.jit
def recovery_sources_kernel(Map, Kept, SlotOf, Sources, N, M, KEEP, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each row ``i`` of a row tile: the first kept slot whose map entry ``A[i, kept[slot]]`` is largest; a
    kept row its own slot (``SlotOf``, from the selection)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, row_ok = _span(pid_m * BLOCK_M, BLOCK_M, N)
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start in range(0, KEEP, BLOCK_K):
        slots, slot_ok = _span(start, BLOCK_K, KEEP)
        index = tl.load(Kept + b * KEEP + slots, mask=slot_ok, other=0)
        values = tl.load(Map + (b * N + rows[:, None]) * M + index[None, :],
                         mask=row_ok[:, None] & slot_ok[None, :], other=float("-inf"))
        chunk_best = tl.max(values, 1)
        chunk_arg = tl.min(tl.where(values == chunk_best[:, None], slots[None, :], KEEP), 1)  # the first maximal slot
        better = chunk_best > best  # strictly: on a tie the earlier chunk's (lower) slot stays
        best = tl.where(better, chunk_best, best)
        arg = tl.where(better, chunk_arg, arg)
    own = tl.load(SlotOf + b * N + rows, mask=row_ok, other=-1)
    tl.store(Sources + b * N + rows, tl.where(own >= 0, own, arg.to(tl.int64)), mask=row_ok)


@triton.jit
def _ordered_keys(scores):
    """Each fp32 score as an int32 whose order is the scores' order (−0 taken as +0, so equal scores get equal keys):
    the sign bit set flips the other 31, the standard radix-sort key."""
    bits = tl.where(scores == 0.0, 0.0, scores).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _kth_largest_key(keys, ok, KEEP):
    """The ``KEEP``-th largest of ``keys`` (among ``ok``): the largest ``t`` with at least ``KEEP`` keys ``≥ t``, found
    bit by bit from the top, 32 counts over the row in registers. TensorRT's ``TopK`` stops at k = 3840; this does
    not, and needs no sort."""
    found = tl.full([], -2147483648, tl.int64)  # every key is ≥ the least int32
    for bit in range(31, -1, -1):  # a loop, not unrolled: 32 copies of a row-wide count would bloat the cubin
        candidate = found + (tl.full([], 1, tl.int64) << bit)  # within int32: ``found``'s bits below ``bit`` are 0
        count = tl.sum(((keys >= candidate.to(tl.int32)) & ok).to(tl.int32), 0)
        found = tl.where(count >= KEEP, candidate, found)
    return found.to(tl.int32)


@triton.jit
def select_kernel(Scores, Kept, SlotOf, N, KEEP, BLOCK: tl.constexpr):
    """One batch item's ``KEEP`` highest-scoring tokens, in index order: every score above the k-th largest, then of
    those equal to it the lowest indices that fill the k slots; ``SlotOf[i]`` is token i's slot, −1 if pruned.

    ``select.topk_keep_indices``' set in one pass with no ``TopK`` before it: the k-th largest comes from
    ``_kth_largest_key``, and which tied tokens are kept depends on the index order alone.
    """
    b = tl.program_id(0).to(tl.int64)
    index, ok = _span(0, BLOCK, N)
    keys = _ordered_keys(tl.load(Scores + b * N + index, mask=ok, other=0.0))
    threshold = _kth_largest_key(keys, ok, KEEP)
    above = (keys > threshold) & ok
    tied = ((keys == threshold) & ok).to(tl.int32)
    room = KEEP - tl.sum(above.to(tl.int32), 0)
    kept = above | ((tied == 1) & (tl.cumsum(tied, 0) - tied < room))
    slot = tl.cumsum(kept.to(tl.int32), 0) - 1
    tl.store(Kept + b * KEEP + slot, index.to(tl.int64), mask=kept)
    tl.store(SlotOf + b * N + index, tl.where(kept, slot, -1).to(tl.int64), mask=ok)


@triton.jit
def gwpr_step_kernel(
    Q, K, Lse, Scores, Out, scale,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_km, stride_kh,
    N, M, H, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """One G-WPR step with no map, for one key tile of one (batch, head): ``Σ_i s_i·exp(q_i·k_j·scale − lse_i)``.

    An attention with the roles of queries and keys swapped: the keys ``j`` are this program's rows, the queries
    ``i`` stream past in tiles, weighted by their scores. Every exponent is ≤ 0 (``lse_i`` is the log of a sum
    that holds that term), so the plain sum neither overflows nor needs a running maximum.
    """
    pid_j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = _batch_and_head(bh, H)
    cols, col_ok = _span(pid_j * BLOCK_M, BLOCK_M, M)
    dims, dim_ok = _span(0, BLOCK_D, D)
    k = _head_rows(K + b * stride_kb + h * stride_kh, cols, col_ok, stride_km, dims, dim_ok)
    qk_scale = scale * LOG2E
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows, row_ok = _span(start, BLOCK_N, N)
        q = _head_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qn, dims, dim_ok)
        lse = tl.load(Lse + (b * H + h) * N + rows, mask=row_ok, other=0.0)
        weight = tl.load(Scores + b * N + rows, mask=row_ok, other=0.0)
        logits = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p = tl.exp2(logits - (lse * LOG2E)[None, :])
        acc += tl.sum(tl.where(row_ok[None, :], p * weight[None, :], 0.0), 1)
    tl.store(Out + (b * H + h) * M + cols, acc, mask=col_ok)


@triton.jit
def recovery_mapless_kernel(
    Q, K, Lse, Kept, SlotOf, Sources, scale,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_km, stride_kh,
    N, M, H, D, KEEP,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """``recovery_sources_kernel`` with no map: each tile of ``A[i, kept]`` is computed from ``q``, ``k`` and lse
    (the heads summed in registers) for the kept keys only, then reduced to the first maximal slot."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows, row_ok = _span(pid_m * BLOCK_M, BLOCK_M, N)
    dims, dim_ok = _span(0, BLOCK_D, D)
    qk_scale = scale * LOG2E
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start in range(0, KEEP, BLOCK_K):
        slots, slot_ok = _span(start, BLOCK_K, KEEP)
        index = tl.load(Kept + b * KEEP + slots, mask=slot_ok, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for h in range(H):
            q = _head_rows(Q + b * stride_qb + h * stride_qh, rows, row_ok, stride_qn, dims, dim_ok)
            k = _head_rows(K + b * stride_kb + h * stride_kh, index, slot_ok, stride_km, dims, dim_ok)
            lse = tl.load(Lse + (b * H + h) * N + rows, mask=row_ok, other=0.0)
            acc += tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - (lse * LOG2E)[:, None])
        values = tl.where(slot_ok[None, :], acc / H, float("-inf"))
        chunk_best = tl.max(values, 1)
        chunk_arg = tl.min(tl.where(values == chunk_best[:, None], slots[None, :], KEEP), 1)
        better = chunk_best > best
        best = tl.where(better, chunk_best, best)
        arg = tl.where(better, chunk_arg, arg)
    own = tl.load(SlotOf + b * N + rows, mask=row_ok, other=-1)
    tl.store(Sources + b * N + rows, tl.where(own >= 0, own, arg.to(tl.int64)), mask=row_ok)


# --- the nodes' kernels ------------------------------------------------------------------------------------------
# One entry kernel per op (per node of a plugin-form graph): what PyTorch launches here and what a TensorRT
# ahead-of-time plugin embeds (``compile/plugins.py``). TensorRT launches such a kernel on the plugin's inputs, then
# the integer arguments its ``aot_impl`` returns, then its outputs, so every entry takes contiguous tensors in that
# order: inputs, their sizes (i32), outputs; the scale (a float, which TensorRT passes no other way) and the tiles
# are compile-time constants. Each entry computes its inputs' strides from the sizes and runs the kernel above.


@triton.jit
def attention_lse_node(Q, K, V, N, M, H, D, Out, Lse, SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    attention_lse_kernel(Q, K, V, Out, Lse, SCALE, N * H * D, H * D, D, M * H * D, H * D, D, M * H * D, H * D, D,
                         N * H * D, H * D, D, N, M, H, D, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit
def head_mean_map_node(Q, K, Lse, N, M, H, D, Map, ColSum, SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    head_mean_map_kernel(Q, K, Lse, Map, ColSum, SCALE, N * H * D, H * D, D, M * H * D, H * D, D, N, M, H, D,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit
def select_kept_node(Scores, N, KEEP, Kept, SlotOf, BLOCK: tl.constexpr):
    select_kernel(Scores, Kept, SlotOf, N, KEEP, BLOCK)


@triton.jit
def recovery_sources_node(Map, Kept, SlotOf, N, M, KEEP, Sources, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    recovery_sources_kernel(Map, Kept, SlotOf, Sources, N, M, KEEP, BLOCK_M, BLOCK_K)


@triton.jit
def gwpr_step_node(Q, K, Lse, Scores, N, M, H, D, Out, SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    gwpr_step_kernel(Q, K, Lse, Scores, Out, SCALE, N * H * D, H * D, D, M * H * D, H * D, D, N, M, H, D,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit
def recovery_mapless_node(Q, K, Lse, Kept, SlotOf, N, M, H, D, KEEP, Sources, SCALE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    recovery_mapless_kernel(Q, K, Lse, Kept, SlotOf, Sources, SCALE, N * H * D, H * D, D, M * H * D, H * D, D,
                            N, M, H, D, KEEP, BLOCK_M, BLOCK_K, BLOCK_D, PRECISION)


@dataclass(frozen=True)
class Launch:
    """How an op's entry kernel is launched, from its inputs' shapes: the one place the torch launcher and the
    TensorRT plugin (``compile/plugins.py``) read it, so both launch the same kernel the same way."""

    kernel: object  # the entry kernel (a triton JITFunction)
    sizes: tuple[str, ...]  # its integer arguments, after the inputs
    grid: Callable[[dict[str, int], Tiles], tuple[int, ...]]  # from the sizes (and ``B``, the batch)
    tiles: Tiles
    scalars: tuple[str, ...]  # the op's scalar arguments in order (its schema's): ``scale`` a constant, ``keep`` a size

    def constexprs(self, sizes: dict[str, int], dtype: torch.dtype, scale: float | None) -> dict[str, object]:
        """The compile-time constants: the scale, the tiles, the head-dim tile and the dot's precision."""
        names = self.kernel.arg_names
        values = {"SCALE": scale, "BLOCK_M": self.tiles.block_m, "BLOCK_N": self.tiles.block_n,
                  "BLOCK_K": self.tiles.block_n, "BLOCK_D": block_d(sizes.get("D", 16)),
                  "PRECISION": precision(dtype), "BLOCK": triton.next_power_of_2(sizes.get("N", 1))}
        return {name: values[name] for name in names if name in values}


def sizes_of(name: str, shapes: list[tuple[int, ...]], scalars: dict[str, float | int]) -> dict[str, int]:
    """An op's sizes from its inputs' shapes and its scalars (``B`` for the grid, the rest the entry's integer
    arguments)."""
    first = shapes[0]
    if name in ("attention_lse", "head_mean_map", "gwpr_step", "recovery_mapless"):
        sizes = {"B": first[0], "N": first[1], "M": shapes[1][1], "H": first[2], "D": first[3]}
        if name == "recovery_mapless":
            sizes["KEEP"] = shapes[3][1]
        return sizes
    if name == "select_kept":
        return {"B": first[0], "N": first[1], "KEEP": int(scalars["keep"])}
    return {"B": first[0], "N": first[1], "M": first[2], "KEEP": shapes[1][1]}  # recovery_sources


LAUNCHES: dict[str, Launch] = {
    "attention_lse": Launch(attention_lse_node, ("N", "M", "H", "D"),
                            lambda s, t: (triton.cdiv(s["N"], t.block_m), s["B"] * s["H"]), TILES["attention_lse"], ("scale",)),
    "head_mean_map": Launch(head_mean_map_node, ("N", "M", "H", "D"),
                            lambda s, t: (triton.cdiv(s["N"], t.block_m), triton.cdiv(s["M"], t.block_n), s["B"]),
                            TILES["head_mean_map"], ("scale",)),
    "select_kept": Launch(select_kept_node, ("N", "KEEP"), lambda s, t: (s["B"],), TILES["select"], ("keep",)),
    "recovery_sources": Launch(recovery_sources_node, ("N", "M", "KEEP"),
                               lambda s, t: (triton.cdiv(s["N"], t.block_m), s["B"]), TILES["recovery_sources"], ()),
    "gwpr_step": Launch(gwpr_step_node, ("N", "M", "H", "D"),
                        lambda s, t: (triton.cdiv(s["M"], t.block_m), s["B"] * s["H"]), TILES["gwpr_step"], ("scale",)),
    "recovery_mapless": Launch(recovery_mapless_node, ("N", "M", "H", "D", "KEEP"),
                               lambda s, t: (triton.cdiv(s["N"], t.block_m), s["B"]), TILES["recovery_mapless"], ("scale",)),
}


def launch(name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor], scalars: dict[str, float | int],
           tiles: Tiles | None = None) -> None:
    """Run op ``name``'s entry kernel on contiguous ``inputs`` into ``outputs``, its ``scalars`` by name (the scale
    compiled in, a count passed as a size); ``tiles``: other than ``TILES``'s, for a sweep."""
    spec = LAUNCHES[name]
    if tiles is not None:
        spec = dataclasses.replace(spec, tiles=tiles)
    inputs = [t.contiguous() for t in inputs]
    sizes = sizes_of(name, [tuple(t.shape) for t in inputs], scalars)
    dtype = inputs[0].dtype
    spec.kernel[spec.grid(sizes, spec.tiles)](
        *inputs, *(sizes[n] for n in spec.sizes), *outputs, **spec.constexprs(sizes, dtype, scalars.get("scale")),
        num_warps=spec.tiles.num_warps, num_stages=spec.tiles.num_stages)


def block_d(head_dim: int) -> int:
    """The head-dim tile: a power of two of at least 16 (``tl.dot``'s least), masked beyond ``head_dim``."""
    return max(16, triton.next_power_of_2(head_dim))


def precision(dtype: torch.dtype) -> str:
    """``ieee`` for fp32 inputs (TF32 would round the logits to 10 bits); fp16/bf16 take the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def run(name: str, *args: object, tiles: Tiles | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Op ``name`` on its arguments (``ops.py``'s signature): outputs allocated (``outputs.allocate``), one launch."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    values = [a for a in args if isinstance(a, (float, int))]
    scalars = dict(zip(LAUNCHES[name].scalars, values, strict=True))
    outputs = allocate(name, args)
    launch(name, tensors, list(outputs), scalars, tiles)
    return outputs[0] if len(outputs) == 1 else outputs
