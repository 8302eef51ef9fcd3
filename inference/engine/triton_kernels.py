"""Triton kernels for CUDA machines: the W2A8 ternary matmul of BitLinear and the fused
multi-adapter low-rank path of DoraLinear (Punica's SGMV shrink/expand, for DoRA mixtures).

Triton is an optional extra (`requirements-gpu.txt`, ~1 GB installed), so nothing here imports it
until a kernel is needed: the engine imports and runs on the default install, and on a CPU-only
machine `available()` is False without ever touching triton. The tests run the same kernels on CPU
tensors through Triton's interpreter (`TRITON_INTERPRET=1`).

Triton picks interpreter or compiler when `triton.jit` wraps a function, not when triton is
imported, so the kernels below are plain functions wrapped lazily, once per mode (`_jit`): a process
that imported triton earlier (torch.compile does) can still switch the interpreter on before the
first launch. For the same reason the kernels call only Triton builtins (tl.full, tl.dot,
tl.maximum...), never triton.language's own jit-wrapped helpers (tl.zeros, tl.max, tl.cdiv...):
those are wrapped when triton is imported and stay in that mode. Module globals are out of reach
of a kernel, so constants are literals.
"""

# Kernel annotations (`tl.constexpr`) stay strings until triton is loaded; Triton reads them as such.
from __future__ import annotations

import torch

triton = tl = None  # bound by _load(), on first need

# Block sizes, fixed rather than autotuned (autotuning needs the GPU at hand and costs warm-up per
# shape). Decode (few rows): narrow tiles so the packed weight matrix, which dominates memory
# traffic, is spread over many programs; prefill: taller tiles so each weight tile is reused.
# `tl.dot` needs every tile dimension >= 16.
W2A8_DECODE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, num_warps=4)
W2A8_PREFILL = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, num_warps=4)
DECODE_ROWS = 16  # up to this many token rows use the decode tiles
SHRINK = dict(BLOCK_M=16, BLOCK_J=32, BLOCK_K=128, num_warps=4)
SHRINK_PREFILL = dict(BLOCK_M=64, BLOCK_J=32, BLOCK_K=64, num_warps=4)
SHRINK_PROGRAMS = 128  # split-K target: about one program per SM of an H100 (132) or A100 (108)
EXPAND = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_J=32, num_warps=4)
EXPAND_PREFILL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_J=32, num_warps=4)


def _load() -> bool:
    global triton, tl
    if triton is None:
        try:
            import triton as _triton
            import triton.language as _tl
        except ImportError:
            return False
        triton, tl = _triton, _tl
    return True


_AVAILABLE: bool | None = None


def available() -> bool:
    """True when the kernels can run compiled: a CUDA device (Ampere or newer, for int8/bf16
    tensor-core dots) and triton importable. Cached: the layers ask on every forward."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = bool(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) and _load())
    return _AVAILABLE


def interpreting() -> bool:
    """Whether a kernel wrapped now runs in Triton's interpreter (TRITON_INTERPRET=1)."""
    return _load() and bool(triton.knobs.runtime.interpret)


_JITTED: dict[tuple[str, bool], object] = {}


def _jit(fn):
    """`triton.jit(fn)`, once per (kernel, interpreter on/off)."""
    if not _load():
        raise RuntimeError("triton is not installed: pip install -r requirements-gpu.txt")
    key = (fn.__name__, interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _check_device(*tensors: torch.Tensor) -> None:
    if not _load():
        raise RuntimeError("triton is not installed: pip install -r requirements-gpu.txt")
    if not interpreting() and not all(t.is_cuda for t in tensors):
        raise RuntimeError("Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")


# -- W2A8: int8 activations x packed ternary weights ---------------------------------------------
def _w2a8_kernel(x_ptr, w_ptr, s_ptr, ws_ptr, y_ptr, M, N4, K, stride_xm, stride_wn, stride_ym,
                 QUANTIZE: tl.constexpr, DIVIDE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, i*N4 + n] = scale(m) * sum_k xq[m, k] * (((w[n, k] >> 2i) & 3) - 1), i = 0..3.

    One program owns BLOCK_N packed rows: each byte it loads feeds four output columns, one per
    2-bit field (`pack_ternary`'s four contiguous row blocks), so the packed weights are read once
    and never expanded in memory; the four int8 x int8 -> int32 dots are exact.

    QUANTIZE: x is the float activation and s its per-row absmax; the int8 levels are made here,
    tile by tile, exactly as BitLinear._forward_int8 makes them (x_scale = 127 / max(absmax, 1e-5),
    round half to even, clamp), so decode runs one reduction and this one launch instead of a
    chain of small PyTorch ops. Otherwise x is already int8 and s is x_scale.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # packed rows
    rk = tl.arange(0, BLOCK_K)
    s = tl.load(s_ptr + rm, mask=rm < M, other=1.0)
    if QUANTIZE:
        # `127.0 / t` in PyTorch is `t.reciprocal() * 127`: two roundings, reproduced here.
        x_scale = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), tl.maximum(s, 1e-5)) * 127.0
    else:
        x_scale = s
    acc0 = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    acc1 = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    acc2 = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    acc3 = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        # Out-of-range k loads x = 0, so whatever weight value sits there adds nothing.
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        if QUANTIZE:  # the product is rounded on its own (launched without FP fusion: no FMA here)
            v = x.to(tl.float32) * x_scale[:, None]
            # torch.round: (v + 1.5 * 2**23) - 1.5 * 2**23 rounds |v| < 2**22 to an integer, half to even
            # (a literal: kernels cannot read module globals).
            x = tl.minimum(tl.maximum((v + 12582912.0) - 12582912.0, -128.0), 127.0).to(tl.int8)
        p = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=(rn[None, :] < N4) & (kk[:, None] < K), other=0)
        acc0 = tl.dot(x, (p & 3).to(tl.int8) - 1, acc0)  # [BLOCK_K, BLOCK_N] ternary tiles, stored value - 1
        acc1 = tl.dot(x, ((p >> 2) & 3).to(tl.int8) - 1, acc1)
        acc2 = tl.dot(x, ((p >> 4) & 3).to(tl.int8) - 1, acc2)
        acc3 = tl.dot(x, ((p >> 6) & 3).to(tl.int8) - 1, acc3)
    # Epilogue in BitLinear._forward_int8's float32 order, so the result matches it bit for bit:
    # "bitlinear" checkpoints divide by (weight_scale * x_scale), "autobitlinear" multiply by
    # (weight_scale / x_scale). div_rn: IEEE division (plain `/` is approximate on the GPU).
    xs = x_scale[:, None] + tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    ws = tl.load(ws_ptr)
    mask = (rm[:, None] < M) & (rn[None, :] < N4)
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    # Stores cast to y's dtype, as `.to(x.dtype)` does.
    if DIVIDE:
        scale = ws * xs
        tl.store(y, tl.math.div_rn(acc0.to(tl.float32), scale), mask=mask)
        tl.store(y + N4, tl.math.div_rn(acc1.to(tl.float32), scale), mask=mask)
        tl.store(y + 2 * N4, tl.math.div_rn(acc2.to(tl.float32), scale), mask=mask)
        tl.store(y + 3 * N4, tl.math.div_rn(acc3.to(tl.float32), scale), mask=mask)
    else:
        scale = tl.math.div_rn(tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32) + ws, xs)
        tl.store(y, acc0.to(tl.float32) * scale, mask=mask)
        tl.store(y + N4, acc1.to(tl.float32) * scale, mask=mask)
        tl.store(y + 2 * N4, acc2.to(tl.float32) * scale, mask=mask)
        tl.store(y + 3 * N4, acc3.to(tl.float32) * scale, mask=mask)


def _w2a8(x: torch.Tensor, s: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, divide_scale: bool,
          out_dtype: torch.dtype, quantize: bool) -> torch.Tensor:
    M, K = x.shape
    N4 = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] != K:
        raise ValueError(f"packed weights must be uint8 [N/4, {K}], got {packed.dtype} {tuple(packed.shape)}")
    _check_device(x, packed)
    x, packed = x.contiguous(), packed.contiguous()
    s = s.reshape(M).float().contiguous()
    ws = weight_scale.reshape(1).float().contiguous()
    y = torch.empty(M, 4 * N4, dtype=out_dtype, device=x.device)
    if M == 0:  # an empty grid is not a valid launch
        return y
    cfg = W2A8_DECODE if M <= DECODE_ROWS else W2A8_PREFILL
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (triton.cdiv(M, bm), triton.cdiv(N4, bn))
    _jit(_w2a8_kernel)[grid](x, packed, s, ws, y, M, N4, K, x.stride(0), packed.stride(0), y.stride(0),
                             QUANTIZE=quantize, DIVIDE=bool(divide_scale), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                             num_warps=cfg["num_warps"], enable_fp_fusion=False)
    return y


def w2a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                divide_scale: bool, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """xq int8 [M, K] (per-token levels), x_scale [M] or [M, 1] float32 (127/absmax), packed uint8
    [N/4, K] (`pack_ternary`), weight_scale [1] -> y [M, N] in `out_dtype`, equal to
    BitLinear._forward_int8's product and scaling."""
    if xq.dtype != torch.int8:
        raise TypeError(f"w2a8_matmul takes int8 activations, got {xq.dtype}")
    return _w2a8(xq, x_scale, packed, weight_scale, divide_scale, out_dtype, quantize=False)


def bitlinear_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """BitLinear._forward_int8 on the GPU, same result: one reduction for the per-token absmax,
    then one kernel that quantises the activations per tile and runs the W2A8 product."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    absmax = torch.linalg.vector_norm(x2, ord=float("inf"), dim=-1, dtype=torch.float32)  # max |x| per token, exact
    y = _w2a8(x2, absmax, layer.weight, layer.weight_scale, layer.divide_scale, x.dtype, quantize=True)
    y = y.reshape(*shape[:-1], layer.out_features)
    if layer.bias is not None:
        y = y + layer.bias.to(x.dtype)
    return y


# -- DoRA mixtures: Punica-style shrink / expand over the resident adapter stacks -----------------
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, w_ptr, t_ptr, M, K, J, R, T, K_PER, stride_xm, stride_am, stride_wb,
                   stride_tm, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """t[m, j] = w[m // T, j // R] * sum_k x[m, k] * A[idx[j // R] * R + j % R, k].

    j runs over (active adapter, rank): the rows of the active adapters are gathered from the
    resident stack through `idx` (no copy of the stack per batch). Row m belongs to sequence m // T
    and takes that sequence's mixture weight of adapter j // R, so sequences with different
    mixtures share one launch; a weight of 0 (an adapter this sequence does not use) zeroes it.

    Split-K, as Punica's shrink: [M, n*r] is a handful of tiles, so program axis 2 splits the long
    K reduction into K_PER-wide chunks whose weighted partial sums are added into the zeroed t.
    """
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    k_start = tl.program_id(2) * K_PER
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    rk = tl.arange(0, BLOCK_K)
    j_ok = rj < J
    arow = tl.load(idx_ptr + rj // R, mask=j_ok, other=0) * R + rj % R  # stack row of each j
    acc = tl.full((BLOCK_M, BLOCK_J), 0.0, tl.float32)
    for k0 in range(k_start, k_start + K_PER, BLOCK_K):  # the last chunk may pass K: masked below
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0.0)
        a = tl.load(a_ptr + arow[None, :] * stride_am + kk[:, None], mask=j_ok[None, :] & (kk[:, None] < K), other=0.0)
        if IEEE:  # float32 operands: full-precision products, as torch.matmul (TF32 is off by default)
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a, acc)
    mask = (rm[:, None] < M) & j_ok[None, :]
    w = tl.load(w_ptr + (rm // T)[:, None] * stride_wb + (rj // R)[None, :], mask=mask, other=0.0)
    tl.atomic_add(t_ptr + rm[:, None] * stride_tm + rj[None, :], acc * w, mask=mask, sem="relaxed")


def _expand_kernel(t_ptr, b_ptr, idx_ptr, y_ptr, g_ptr, o_ptr, M, N, J, R, T,
                   stride_tm, stride_bj, stride_ym, stride_gb, stride_om,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr):
    """o[m, n] = sum_j t[m, j] * Bg[idx[j // R] * R + j % R, n] + g_mix[m // T, n] * y[m, n].

    The DoRA combine (low-rank sum plus the mixture's magnitude rescale of the backbone output)
    happens in the epilogue, so the low-rank result never goes to memory on its own.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCK_J)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for j0 in range(0, J, BLOCK_J):
        jj = j0 + rj
        j_ok = jj < J
        brow = tl.load(idx_ptr + jj // R, mask=j_ok, other=0) * R + jj % R
        b = tl.load(b_ptr + brow[:, None] * stride_bj + rn[None, :], mask=j_ok[:, None] & (rn[None, :] < N), other=0.0)
        t = tl.load(t_ptr + rm[:, None] * stride_tm + jj[None, :], mask=(rm[:, None] < M) & j_ok[None, :], other=0.0)
        # The weighted shrink output meets B in B's dtype (bf16 -> tensor cores), as the PyTorch
        # path's `xa @ Bg` does; float32 stays IEEE.
        if IEEE:
            acc = tl.dot(t, b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(t.to(b.dtype), b, acc)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    y = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + (rm // T)[:, None] * stride_gb + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + rm[:, None] * stride_om + rn[None, :], acc + g * y, mask=mask)


def dora_mixture_reference(x, y, flat_A, flat_B, r, active, weights, g_mix):
    """dora_mixture's arguments through DoraLinear.combine's PyTorch arithmetic (gather the active
    stacks, two matmuls, addcmul): what the kernels are checked and timed against."""
    A = flat_A.view(-1, r, flat_A.shape[1])[active].flatten(0, 1)
    Bg = flat_B.view(-1, r, flat_B.shape[1])[active].flatten(0, 1)
    B_, T, n = x.shape[0], x.shape[1], active.numel()
    xa = (x @ A.t()).view(B_, T, n, r) * weights.to(x.dtype)[:, None, :, None]
    low = xa.view(B_, T, n * r) @ Bg
    return torch.addcmul(low, g_mix.to(x.dtype)[:, None, :], y)


def dora_mixture(x: torch.Tensor, y: torch.Tensor, flat_A: torch.Tensor, flat_B: torch.Tensor, r: int,
                 active: torch.Tensor, weights: torch.Tensor, g_mix: torch.Tensor) -> torch.Tensor:
    """DoraLinear's mixture combine in two launches (shrink, expand):

        out = ((x @ A_act^T) * w per sequence and adapter) @ Bg_act + g_mix * y

    x [B, T, in] (the layer input), y [B, T, out] (backbone output, bias removed), flat_A
    [n_res*r, in] and flat_B [n_res*r, out] (every resident adapter, rank padded to r, B already
    g*s scaled), active [n] (which resident adapters the batch uses), weights [B, n] (each
    sequence's mixture over them; all-zero rows use no adapter), g_mix [B, out].
    Returns out [B, T, out] in y's dtype. The shrink's split-K chunks are added atomically, so on
    the GPU the float32 summation order, and with it the last bits, may vary from run to run.
    """
    B_, T, K = x.shape
    N = y.shape[-1]
    n = active.numel()
    if flat_A.shape != (flat_A.shape[0], K) or flat_B.shape != (flat_A.shape[0], N) or flat_A.shape[0] % r:
        raise ValueError(f"adapter stacks {tuple(flat_A.shape)} / {tuple(flat_B.shape)} do not fit x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}, rank {r}")
    if weights.shape != (B_, n) or g_mix.shape != (B_, N):
        raise ValueError(f"weights {tuple(weights.shape)} / g_mix {tuple(g_mix.shape)} do not fit batch {B_}, "
                         f"{n} active adapters, {N} outputs")
    _check_device(x, y, flat_A, flat_B)
    M, J = B_ * T, n * r
    if M == 0:  # an empty grid is not a valid launch
        return torch.empty_like(y)
    x2, y2 = x.reshape(M, K).contiguous(), y.reshape(M, N).contiguous()
    A, Bg = flat_A.contiguous(), flat_B.contiguous()
    idx = active.to(device=x.device, dtype=torch.int64).contiguous()
    w = weights.to(device=x.device, dtype=torch.float32).contiguous()
    g = g_mix.to(device=x.device, dtype=torch.float32).contiguous()
    # float32 stacks take IEEE float32 dots. So do bf16/fp16 ones under the interpreter, whose dot
    # multiplies 16-bit floats as their raw bit patterns: the upcast products are exact, so this is
    # the tensor-core dot (16-bit operands, float32 accumulation) up to summation order.
    ieee = A.dtype == torch.float32 or interpreting()
    # The weighted shrink output stays float32 between the launches: [M, n*r] is small.
    t = torch.zeros(M, J, dtype=torch.float32, device=x.device)
    cfg = SHRINK if M <= DECODE_ROWS else SHRINK_PREFILL
    tiles, k_blocks = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(J, cfg["BLOCK_J"]), triton.cdiv(K, cfg["BLOCK_K"])
    split = max(1, min(k_blocks, SHRINK_PROGRAMS // tiles))  # about SHRINK_PROGRAMS programs in all
    k_per = triton.cdiv(k_blocks, split) * cfg["BLOCK_K"]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(J, cfg["BLOCK_J"]), triton.cdiv(K, k_per))
    _jit(_shrink_kernel)[grid](x2, A, idx, w, t, M, K, J, r, T, k_per, x2.stride(0), A.stride(0), w.stride(0),
                               t.stride(0),
                               IEEE=ieee, BLOCK_M=cfg["BLOCK_M"], BLOCK_J=cfg["BLOCK_J"], BLOCK_K=cfg["BLOCK_K"],
                               num_warps=cfg["num_warps"])
    out = torch.empty(M, N, dtype=y.dtype, device=x.device)
    cfg = EXPAND if M <= DECODE_ROWS else EXPAND_PREFILL
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _jit(_expand_kernel)[grid](t, Bg, idx, y2, g, out, M, N, J, r, T, t.stride(0), Bg.stride(0), y2.stride(0),
                               g.stride(0), out.stride(0), IEEE=ieee, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                               BLOCK_J=cfg["BLOCK_J"], num_warps=cfg["num_warps"])
    return out.view(B_, T, N)


# -- Ahead-of-time compilation check --------------------------------------------------------------
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_for(arch: int = 90, dtype: torch.dtype = torch.bfloat16) -> dict[str, list[str]]:
    """Compile every kernel in every block configuration for CUDA compute capability `arch`
    (90 = H100, 80 = A100) through Triton's bundled ptxas, without a GPU. The interpreter checks
    arithmetic but not what only the compiler sees (tensor-core lowering, layouts, types), so the
    CPU-only tests run this too. Returns {kernel and blocks: the PTX tensor-core instructions}."""
    import re

    if not _load():
        raise RuntimeError("triton is not installed: pip install -r requirements-gpu.txt")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction  # the compiler's wrapper whatever TRITON_INTERPRET says

    dt = _DTYPES[dtype]
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    jobs = []
    for cfg in (W2A8_DECODE, W2A8_PREFILL):
        for quantize, divide in ((True, False), (True, True), (False, False)):
            sig = dict(x_ptr=f"*{dt}" if quantize else "*i8", w_ptr="*u8", s_ptr="*fp32", ws_ptr="*fp32",
                       y_ptr=f"*{dt}", **ints("M", "N4", "K", "stride_xm", "stride_wn", "stride_ym"))
            jobs.append((_w2a8_kernel, sig, dict(QUANTIZE=quantize, DIVIDE=divide), dict(cfg, enable_fp_fusion=False)))
    ieee = dtype == torch.float32
    for cfg in (SHRINK, SHRINK_PREFILL):
        sig = dict(x_ptr=f"*{dt}", a_ptr=f"*{dt}", idx_ptr="*i64", w_ptr="*fp32", t_ptr="*fp32",
                   **ints("M", "K", "J", "R", "T", "K_PER", "stride_xm", "stride_am", "stride_wb", "stride_tm"))
        jobs.append((_shrink_kernel, sig, dict(IEEE=ieee), cfg))
    for cfg in (EXPAND, EXPAND_PREFILL):
        sig = dict(t_ptr="*fp32", b_ptr=f"*{dt}", idx_ptr="*i64", y_ptr=f"*{dt}", g_ptr="*fp32", o_ptr=f"*{dt}",
                   **ints("M", "N", "J", "R", "T", "stride_tm", "stride_bj", "stride_ym", "stride_gb", "stride_om"))
        jobs.append((_expand_kernel, sig, dict(IEEE=ieee), cfg))
    out = {}
    for fn, sig, consts, cfg in jobs:
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
        consts = {**consts, **blocks}
        sig = {**sig, **{k: "constexpr" for k in consts}}
        kernel = triton.compile(ASTSource(fn=JITFunction(fn), signature=sig, constexprs=consts),
                                target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=cfg["num_warps"],
                                             enable_fp_fusion=cfg.get("enable_fp_fusion", True)))
        label = f"{fn.__name__.strip('_')}[{','.join(f'{k}={v}' for k, v in consts.items())}]"
        out[label] = sorted(set(re.findall(r"\b(w?mma[.\w]*\.(?:s8|bf16|f16|f32|tf32)\b[.\w]*)", kernel.asm["ptx"])))
    return out
