"""Triton paged attention over the shared cache layout: split-K decode, a log-sum-exp merge, causal prefill/extend.

All programs of one kv head hold every query head of its GQA group, so each KV tile is read once per group.
Softmax runs online in fp32 (base 2, scale folded into the logits). Layout and semantics: `reference.py`.
A sliding window (`HAS_WINDOW`) skips the tiles before it and masks within them; a soft-cap (`SOFTCAP`) maps the
scaled logits through cap * tanh(s / cap). Both are compile-time switches, so a layer with neither runs the same
code as before they existed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Running max before any key is seen: finite, so a fully masked row gives exp2(-inf - M_INIT) = 0, never NaN.
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _tanh(x):
    """tanh in fp32 (Triton has none that the interpreter also runs): an odd polynomial near zero (Cephes' tanhf,
    relative error ~1e-7), 1 - 2 / (exp(2|x|) + 1) elsewhere, the sign put back."""
    a = tl.abs(x)
    z = a * a
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z) - (
        3.33332819422e-1
    )
    small = a + a * z * poly
    large = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(a, 20.0)) + 1.0)
    t = tl.where(a < 0.625, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def _attend_tile(
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    pos,
    pos_mask,
    s_mask,
    kv_head,
    dims,
    m_i,
    l_i,
    acc,
    scale_log2,
    cap_in,
    cap_out,
    stride_b,
    stride_s,
    stride_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Gather TILE_N cached keys/values of one kv head and take one online-softmax step for q [M, D].

    Logits in base 2: dot * scale_log2, or with SOFTCAP cap * tanh(dot * scale / cap) * log2(e), i.e.
    tanh(dot * cap_in) * cap_out."""
    block = tl.load(table_row + pos // BLOCK_SIZE, mask=pos_mask, other=0).to(tl.int64)  # [TILE_N]
    row = block * stride_b + (pos % BLOCK_SIZE) * stride_s + kv_head * stride_h  # [TILE_N] element offsets
    d_mask = dims < HEAD_DIM
    k = tl.load(
        k_cache_ptr + row[None, :] + dims[:, None], mask=pos_mask[None, :] & d_mask[:, None], other=0.0
    )  # [BLOCK_D, TILE_N]
    v = tl.load(
        v_cache_ptr + row[:, None] + dims[None, :], mask=pos_mask[:, None] & d_mask[None, :], other=0.0
    )  # [TILE_N, BLOCK_D]
    if DOT_FP32:
        # fp32 tiles: exact on GPU ("ieee", no tf32) and the only correct path for bf16 under the interpreter.
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")  # [M, TILE_N]
    else:
        s = tl.dot(q, k.to(q.dtype))
    if SOFTCAP:
        s = _tanh(s * cap_in) * cap_out
    else:
        s = s * scale_log2
    s = tl.where(s_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [M]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [M, TILE_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")  # [M, BLOCK_D]
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    cap_in,
    cap_out,
    window,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_kv_b,
    stride_kv_s,
    stride_kv_h,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Grid (num_seqs, num_kv_heads, NUM_SPLITS); each program covers one slice of one sequence's keys (those
    inside the window, with one)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_len != 1:  # prefill rows (mixed batches) belong to the prefill kernel
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    if HAS_WINDOW:
        kv_start = tl.maximum(seq_len - window, 0)  # the query at seq_len - 1 sees keys kv_start..seq_len - 1
    else:
        kv_start = seq_len * 0
    first_tile = kv_start // TILE_N
    num_tiles = tl.cdiv(seq_len, TILE_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, first_tile + num_tiles)

    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # [BLOCK_G]
    row_mask = g < GROUP
    q_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)  # [BLOCK_G, BLOCK_D]
    q_row = q_start.to(tl.int64) * stride_q_t
    q = tl.load(q_ptr + q_row + heads[:, None] * stride_q_h + dims[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        pos = tile * TILE_N + tl.arange(0, TILE_N)  # [TILE_N]
        pos_mask = pos < seq_len
        if HAS_WINDOW:
            pos_mask = pos_mask & (pos >= kv_start)  # block-table entries before the window are never read
        m_i, l_i, acc = _attend_tile(
            q,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            pos,
            pos_mask,
            pos_mask[None, :],
            kv_head,
            dims,
            m_i,
            l_i,
            acc,
            scale_log2,
            cap_in,
            cap_out,
            stride_kv_b,
            stride_kv_s,
            stride_kv_h,
            HEAD_DIM,
            BLOCK_SIZE,
            DOT_FP32,
            SOFTCAP,
        )

    if NUM_SPLITS == 1:
        # l == 0 only for an empty context (CUDA-graph padding rows): write zeros, not 0/0.
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptr = out_ptr + q_start.to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + dims[None, :]
        tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials [num_seqs, NUM_HEADS, NUM_SPLITS, (BLOCK_D | 2)]: unnormalised acc, running max, sum.
        part = (seq * NUM_HEADS + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], acc, mask=row_mask[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_mask)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_mask)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_ml_ptr,
    query_start_loc_ptr,
    stride_o_t,
    stride_o_h,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Grid (num_seqs, num_heads): rescale each split by exp2(m_split - m_max) and normalise once."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < NUM_SPLITS
    part = (seq * NUM_HEADS + head).to(tl.int64) * NUM_SPLITS + splits  # [BLOCK_S]
    m = tl.load(part_ml_ptr + part * 2, mask=split_mask, other=M_INIT)
    denom = tl.load(part_ml_ptr + part * 2 + 1, mask=split_mask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=split_mask[:, None], other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))  # [BLOCK_S]; empty splits carry denom = 0 and acc = 0
    total = tl.sum(weight * denom, axis=0)
    o = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    o_ptr = out_ptr + q_start.to(tl.int64) * stride_o_t + head * stride_o_h + dims
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    scale_log2,
    cap_in,
    cap_out,
    window,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_kv_b,
    stride_kv_s,
    stride_kv_h,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Grid (num_tokens // BLOCK_Q + num_seqs, num_kv_heads): BLOCK_Q query tokens x the GQA group per program.

    Sequence i owns programs [qsl[i] // BLOCK_Q + i, qsl[i + 1] // BLOCK_Q + i + 1), at least cdiv(q_len, BLOCK_Q)
    of them, so the grid depends only on static shapes; a binary search finds a program's sequence.
    """
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    lo = pid * 0  # int32 tensors from the start: num_seqs may arrive specialised as a constant
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        go_right = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= pid
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_first = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query token of this program, within the sequence
    if q_len < 2 or q_first >= q_len:  # decode rows belong to the decode kernel
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys cached before this step

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    tok = q_first + rows // BLOCK_G  # [M] query token within the sequence
    heads = kv_head * GROUP + rows % BLOCK_G  # [M]
    row_mask = (tok < q_len) & (rows % BLOCK_G < GROUP)
    dims = tl.arange(0, BLOCK_D)
    q_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)  # [M, BLOCK_D]
    token_row = (q_start + tok).to(tl.int64)  # [M]
    q = tl.load(
        q_ptr + token_row[:, None] * stride_q_t + heads[:, None] * stride_q_h + dims[None, :], mask=q_mask, other=0.0
    )
    q_pos = context_len + tok  # [M] absolute position: attends keys 0..q_pos

    m_i = tl.full([BLOCK_Q * BLOCK_G], M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_end = tl.minimum(seq_len, context_len + q_first + BLOCK_Q)  # the causal horizon of the last token here
    if HAS_WINDOW:
        kv_start = tl.maximum(context_len + q_first - window + 1, 0)  # the first key the first token here sees
    else:
        kv_start = kv_end * 0
    for start in range(kv_start // TILE_N * TILE_N, kv_end, TILE_N):
        pos = start + tl.arange(0, TILE_N)  # [TILE_N]
        pos_mask = pos < kv_end
        s_mask = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])  # [M, TILE_N]
        if HAS_WINDOW:
            pos_mask = pos_mask & (pos >= kv_start)  # block-table entries before every window are never read
            s_mask = s_mask & (pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _attend_tile(
            q,
            k_cache_ptr,
            v_cache_ptr,
            table_row,
            pos,
            pos_mask,
            s_mask,
            kv_head,
            dims,
            m_i,
            l_i,
            acc,
            scale_log2,
            cap_in,
            cap_out,
            stride_kv_b,
            stride_kv_s,
            stride_kv_h,
            HEAD_DIM,
            BLOCK_SIZE,
            DOT_FP32,
            SOFTCAP,
        )

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = out_ptr + token_row[:, None] * stride_o_t + heads[:, None] * stride_o_h + dims[None, :]
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=q_mask)


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLITS = 32
MAX_HEAD_DIM = 256


@dataclass(slots=True, frozen=True)
class TileConfig:
    """Compile-time tile sizes of one launch; `tile_config` picks them, tests shrink them to reach edges."""

    block_d: int  # head_dim padded to a power of two >= 16
    tile_n: int  # keys per inner-loop step
    block_m: int  # prefill rows per program: query tokens x padded GQA group
    num_warps: int
    dot_fp32: bool  # upcast tiles and multiply in fp32


def tile_config(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> TileConfig:
    """Tiles checked on sm_90 to compile without register spills (see tests/model_handler/kernels)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Under the interpreter bf16 tl.dot is wrong, so CPU always multiplies in fp32.
    dot_fp32 = not on_gpu or dtype == torch.float32
    if on_gpu and dtype == torch.float32:
        # fp32 ("ieee") dots run on FMA units with whole tiles in registers: small tiles avoid spills.
        return TileConfig(block_d, tile_n=16, block_m=16, num_warps=4, dot_fp32=True)
    if block_d <= 128:
        return TileConfig(block_d, tile_n=64, block_m=64, num_warps=4, dot_fp32=dot_fp32)
    return TileConfig(block_d, tile_n=32, block_m=32, num_warps=8, dot_fp32=dot_fp32)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: more programs only cost time
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per decode sequence from static shapes only (CUDA-graph safe): at least two programs per SM.

    A power of two, so the graphs captured for every batch size share a handful of compiled variants.
    """
    wanted = triton.cdiv(2 * _num_sms(device), max(1, num_seqs * num_kv_heads))
    return min(MAX_SPLITS, triton.next_power_of_2(wanted))


def launch_constexprs(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_splits: int,
    cfg: TileConfig,
    on_gpu: bool,
    has_window: bool = False,
    softcap: bool = False,
) -> dict[str, dict]:
    """Compile-time arguments (and warps/stages) of the "decode", "merge" and "prefill" launches."""
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    common = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=cfg.block_d,
        BLOCK_SIZE=block_size,
        TILE_N=cfg.tile_n,
        DOT_FP32=cfg.dot_fp32,
        HAS_WINDOW=has_window,
        SOFTCAP=softcap,
        num_warps=cfg.num_warps,
        num_stages=2,
    )
    # tl.dot needs >= 16 rows when compiled: small GQA groups are padded with masked rows.
    block_m = max(cfg.block_m, 16) if on_gpu else cfg.block_m
    return {
        "decode": dict(NUM_HEADS=num_heads, GROUP=group, BLOCK_G=max(16, block_g), NUM_SPLITS=num_splits, **common),
        "merge": dict(
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=cfg.block_d,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
        ),
        "prefill": dict(GROUP=group, BLOCK_G=block_g, BLOCK_Q=max(1, block_m // block_g), **common),
    }


def _check_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out) -> None:
    """Shape, dtype, stride and device checks; reads no tensor values, so it never syncs the device."""
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got shape {tuple(query.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(
            f"k_cache and v_cache need equal strides, contiguous in head_dim; got {k_cache.stride()} and "
            f"{v_cache.stride()}"
        )
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} must match the cache ({k_cache.shape[3]}) and be <= {MAX_HEAD_DIM}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    for name, t in (("query", query), ("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported; expected float32, float16 or bfloat16")
    if out.shape != query.shape:
        raise ValueError(f"out must have the query's shape {tuple(query.shape)}, got {tuple(out.shape)}")
    if query.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError(f"query and out must be contiguous in head_dim; strides {query.stride()}, {out.stride()}")
    num_seqs = seq_lens.shape[0]
    for name, t, shape in (
        ("seq_lens", seq_lens, (num_seqs,)),
        ("query_start_loc", query_start_loc, (num_seqs + 1,)),
        ("block_tables", block_tables, (num_seqs, block_tables.shape[-1])),
    ):
        if t.dtype != torch.int32 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be int32 of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    tensors = (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all attention inputs must be on one device, got {sorted(map(str, devices))}")


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    *,
    num_splits: int | None = None,
    config: TileConfig | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same result as `reference.paged_attention`, without host syncs.

    Rows with one query token go through split-K decode (+ the merge when `num_splits` > 1); when
    `max_query_len` > 1 a second launch covers the longer rows. Grids depend on shapes only.
    """
    if out is None:
        out = torch.empty_like(query)
    _check_inputs(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    on_gpu = query.device.type == "cuda"
    cfg = config or tile_config(head_dim, query.dtype, on_gpu)
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, query.device)
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in 1..256, got {num_splits}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    consts = launch_constexprs(
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        num_splits,
        cfg,
        on_gpu,
        has_window=sliding_window is not None,
        softcap=softcap is not None,
    )
    strides = (
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
    )
    scale_log2 = scale * LOG2E
    # Runtime values behind the compile-time switches (unused, and not specialised on, when a switch is off).
    cap_in, cap_out = (scale / softcap, softcap * LOG2E) if softcap is not None else (1.0, 1.0)
    window = sliding_window if sliding_window is not None else 0

    if num_splits > 1:
        part_acc = torch.empty((num_seqs, num_heads, num_splits, cfg.block_d), dtype=torch.float32, device=query.device)
        part_ml = torch.empty((num_seqs, num_heads, num_splits, 2), dtype=torch.float32, device=query.device)
    else:
        part_acc = part_ml = out  # unused: the kernel writes `out` directly
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        out,
        part_acc,
        part_ml,
        block_tables,
        seq_lens,
        query_start_loc,
        scale_log2,
        cap_in,
        cap_out,
        window,
        *strides,
        **consts["decode"],
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_ml, query_start_loc, out.stride(0), out.stride(1), **consts["merge"]
        )
    if max_query_len > 1:
        block_q = consts["prefill"]["BLOCK_Q"]
        _prefill_kernel[(num_tokens // block_q + num_seqs, num_kv_heads)](
            query,
            k_cache,
            v_cache,
            out,
            block_tables,
            seq_lens,
            query_start_loc,
            num_seqs,
            scale_log2,
            cap_in,
            cap_out,
            window,
            *strides,
            **consts["prefill"],
        )
    return out
