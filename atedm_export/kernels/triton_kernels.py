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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def select_kernel(Scores, Top, Kept, SlotOf, N, KEEP, BLOCK: tl.constexpr):
    """One batch item's kept tokens, in index order: every score above the k-th largest (the last of ``Top``, the
    k largest in descending order), then of those equal to it the lowest indices that fill the k slots;
    ``SlotOf[i]`` is token i's slot, −1 if pruned.

    ``select.topk_keep_indices`` in one pass (its ~17 ops), the same set: which tied tokens are kept depends on
    the index order alone, never on how the k-th largest was found.
    """
    b = tl.program_id(0).to(tl.int64)
    index, ok = _span(0, BLOCK, N)
    scores = tl.load(Scores + b * N + index, mask=ok, other=float("-inf"))
    threshold = tl.load(Top + b * KEEP + KEEP - 1)
    above = (scores > threshold) & ok
    tied = ((scores == threshold) & ok).to(tl.int32)
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
KERNELS = {"attention_lse": attention_lse_kernel, "head_mean_map": head_mean_map_kernel,
           "recovery_sources": recovery_sources_kernel, "select": select_kernel, "gwpr_step": gwpr_step_kernel,
           "recovery_mapless": recovery_mapless_kernel}


def block_d(head_dim: int) -> int:
    """The head-dim tile: a power of two of at least 16 (``tl.dot``'s least), masked beyond ``head_dim``."""
    return max(16, triton.next_power_of_2(head_dim))


def precision(dtype: torch.dtype) -> str:
    """``ieee`` for fp32 inputs (TF32 would round the logits to 10 bits); fp16/bf16 take the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_last(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels step the last axis by 1: a view with another last stride is made contiguous."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N, H, d]`` queries, ``[B, M, H, d]`` keys and values → output ``[B, N, H, d]``, lse ``[B, H, N]`` fp32."""
    q, k, v = _unit_last(q, k, v)
    batch, tokens, heads, dim = q.shape
    out = torch.empty((batch, tokens, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
    tiles = TILES["attention_lse"]
    grid = (triton.cdiv(tokens, tiles.block_m), batch * heads)
    attention_lse_kernel[grid](
        q, k, v, out, lse, scale, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        tokens, k.shape[1], heads, dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d(dim),
        PRECISION=precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out, lse


def head_mean_map(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The head-mean map ``[B, N, M]`` fp32 and G-WPR's first step from uniform scores, ``[B, M]``."""
    q, k = _unit_last(q, k)
    batch, tokens, heads, dim = q.shape
    keys = k.shape[1]
    tiles = TILES["head_mean_map"]
    row_tiles = triton.cdiv(tokens, tiles.block_m)
    attn_map = torch.empty((batch, tokens, keys), dtype=torch.float32, device=q.device)
    column_sums = torch.empty((batch, row_tiles, keys), dtype=torch.float32, device=q.device)
    grid = (row_tiles, triton.cdiv(keys, tiles.block_n), batch)
    head_mean_map_kernel[grid](
        q, k, lse.contiguous(), attn_map, column_sums, scale, *q.stride()[:3], *k.stride()[:3],
        tokens, keys, heads, dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d(dim),
        PRECISION=precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return attn_map, column_sums.sum(dim=1)


def select(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` highest scores' tokens ``[B, keep]`` in index order, ties to the lower index, and each token's
    slot ``[B, N]`` (−1 where pruned): ``torch.topk`` for the k-th largest score, then ``select_kernel``."""
    scores = scores.float().contiguous()
    batch, tokens = scores.shape
    top = scores.topk(keep, dim=1).values  # descending: the k-th largest is the last, however ties sort
    kept = torch.empty((batch, keep), dtype=torch.int64, device=scores.device)
    slot_of = torch.empty((batch, tokens), dtype=torch.int64, device=scores.device)
    select_kernel[(batch,)](scores, top.contiguous(), kept, slot_of, tokens, keep, BLOCK=triton.next_power_of_2(tokens),
                            num_warps=TILES["select"].num_warps)
    return kept, slot_of


def recovery_sources(attn_map: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` kept slots: the first slot ``j`` maximizing ``attn_map[b, i, kept[b, j]]`` for every row ``i``,
    a kept row's own slot for a kept row."""
    batch, tokens, keys = attn_map.shape
    keep = kept.shape[1]
    sources = torch.empty((batch, tokens), dtype=torch.int64, device=attn_map.device)
    tiles = TILES["recovery_sources"]
    grid = (triton.cdiv(tokens, tiles.block_m), batch)
    recovery_sources_kernel[grid](attn_map.contiguous(), kept.contiguous(), slot_of.contiguous(), sources, tokens, keys, keep,
                                  BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_n, num_warps=tiles.num_warps,
                                  num_stages=tiles.num_stages)
    return sources


def gwpr_step(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scores: torch.Tensor, scale: float) -> torch.Tensor:
    """``s' = s·A`` ``[B, M]`` for ``A = mean_h softmax(q_h·k_hᵀ·scale)``, never forming ``A``: one pass per step."""
    q, k = _unit_last(q, k)
    batch, tokens, heads, dim = q.shape
    keys = k.shape[1]
    tiles = TILES["gwpr_step"]
    per_head = torch.empty((batch, heads, keys), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(keys, tiles.block_m), batch * heads)
    gwpr_step_kernel[grid](
        q, k, lse.contiguous(), scores.float().contiguous(), per_head, scale, *q.stride()[:3], *k.stride()[:3],
        tokens, keys, heads, dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=block_d(dim),
        PRECISION=precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return per_head.mean(dim=1)


def recovery_mapless(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, kept: torch.Tensor, slot_of: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``recovery_sources`` of the map ``q``, ``k`` and lse define, computed for the kept keys only."""
    q, k = _unit_last(q, k)
    batch, tokens, heads, dim = q.shape
    keep = kept.shape[1]
    tiles = TILES["recovery_mapless"]
    sources = torch.empty((batch, tokens), dtype=torch.int64, device=q.device)
    grid = (triton.cdiv(tokens, tiles.block_m), batch)
    recovery_mapless_kernel[grid](
        q, k, lse.contiguous(), kept.contiguous(), slot_of.contiguous(), sources, scale, *q.stride()[:3], *k.stride()[:3],
        tokens, k.shape[1], heads, dim, keep, BLOCK_M=tiles.block_m, BLOCK_K=tiles.block_n, BLOCK_D=block_d(dim),
        PRECISION=precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return sources
