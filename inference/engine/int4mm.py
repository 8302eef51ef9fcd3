"""Our int4 weight-only matmul for CPUs with AVX512-BF16 (`int4mm.cpp`, ops `torch.ops.r3mes.*`).

PyTorch's `_weight_int4pack_mm_for_cpu` dequantises to float32 and multiplies with FMAs: from four
rows on it is compute-bound (8 rows cost ~3x one), and one row reads memory at well under the
machine's rate. Ours keeps the weights as small integers, exact in bfloat16, and multiplies them
with VDPBF16PS (32 products an instruction), each dequantised vector serving every row: 1.8-3.3x
PyTorch's on SmolLM2's shapes at one row, ~2x at eight (benchmarks/RESULTS.md, thirteenth
session). Same quantisation (speed.Int4Linear: W ~= (q - 8) * scale + zero per group of 32
inputs), float32 sums: it agrees with PyTorch's kernel to float32 rounding, then bfloat16's.

- `int4_mm(x, w)`: what Int4Linear calls, eager and in the compiled graphs.
- `int4_mm_lowrank(...)`: a compiled decode step's DoRA group (q|k|v, o, gate|up, down) fused
  into its backbone product (dora.lowrank_product): the factors are read in place from the step's
  packed tensors, one thread shrinks while the other starts on the product, and the expand is
  added as each block of outputs comes out. One call instead of a product and Inductor's
  single-threaded loops.
- `available()`: whether this CPU has AVX512-BF16 and the ops are built and loaded (native.py:
  once per machine, ~10 s; a failed build is logged once and the engine keeps PyTorch's kernel).
- `pack_int4(q, scale, zero)`: the ops' layout (int4mm.cpp's header) from q [N, K] in 0..15 and
  bfloat16 scale, zero [N, K/32]; N a multiple of 16. `unpack_int4(w)`: back again.

R3MES_INT4_KERNEL=aten keeps PyTorch's kernel even where ours runs (A/B benchmarks).
"""

import functools
import os
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("int4mm.cpp")
GROUP = 32
BLOCK = 16  # outputs per block
BLOCK_BYTES = 320  # 256 bytes of nibbles, 16 bf16 scales, 16 bf16 zeros


def cpu_has_avx512_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags and " avx512bw" in flags


@functools.cache
def available() -> bool:
    if os.environ.get("R3MES_INT4_KERNEL", "") == "aten" or not cpu_has_avx512_bf16():
        return False
    flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
    if not native.load(SOURCE, flags, "int4 AVX512-BF16 kernel"):
        return False
    _register_fake()
    return True


def _register_fake() -> None:
    """The op's shapes, for torch.compile's tracing."""
    @torch.library.register_fake("r3mes::int4_mm")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0] * BLOCK)

    @torch.library.register_fake("r3mes::int4_mm_lowrank")
    def _(x, w, F, a_at, G, g_at, Wt, w_at, size0, size1, size2):
        return x.new_empty(x.shape[0], w.shape[0] * BLOCK)


def int4_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] bfloat16 @ the packed weight's W^T -> [M, 16 w.shape[0]] bfloat16 (after available())."""
    return torch.ops.r3mes.int4_mm(x, w)


def int4_mm_lowrank(x: torch.Tensor, w: torch.Tensor, F: torch.Tensor, a_at: int, G: torch.Tensor, g_at: int,
                    Wt: torch.Tensor | None, w_at: int, sizes: list[int]) -> torch.Tensor:
    """One DoRA group fused with its backbone product: g * bf16(x W^T) + B((A x) * w), float32, the
    factors, g and the rows' weights read in place from dora.pack_lowrank's tensors at those
    element offsets (int4mm.cpp documents the shapes; dora.lowrank_product calls it)."""
    if not 1 <= len(sizes) <= 3:
        raise ValueError(f"int4_mm_lowrank takes a group of 1-3 projections, got {len(sizes)}")
    sizes = list(sizes) + [0] * (3 - len(sizes))
    return torch.ops.r3mes.int4_mm_lowrank(x, w, F, a_at, G, g_at, G if Wt is None else Wt, -1 if Wt is None else w_at,
                                           *sizes)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    if N % BLOCK or K % GROUP:
        raise ValueError(f"int4 packing needs outputs in multiples of {BLOCK} and inputs of {GROUP}, got {N}x{K}")
    G = K // GROUP
    # q [N, K] -> [N/16, G, chunk c 4, t 4, lane i 16, e 2] with k = 32 g + 8 c + 2 t + e
    q = q.to(torch.int32).reshape(N // BLOCK, BLOCK, G, 4, 4, 2).permute(0, 2, 3, 4, 1, 5)
    lanes = (q[:, :, :, 0] | q[:, :, :, 1] << 4 | q[:, :, :, 2] << 8 | q[:, :, :, 3] << 12)  # [N/16, G, 4, 16, 2]
    # 16-bit lanes as bytes (lanes over 32767 wrap to negative int16: the same bits)
    nibbles = lanes.to(torch.int16).contiguous().view(torch.uint8).reshape(N // BLOCK, G, 256)
    sz = torch.stack([scale, zero]).to(torch.bfloat16).reshape(2, N // BLOCK, BLOCK, G).permute(1, 3, 0, 2)
    sz = sz.contiguous().view(torch.uint8).reshape(N // BLOCK, G, 64)
    return torch.cat([nibbles, sz], dim=-1).contiguous()


def unpack_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks, G, _ = w.shape
    lanes = w[..., :256].contiguous().view(torch.int16).to(torch.int32).reshape(blocks, G, 4, 1, BLOCK, 2)
    q = (lanes >> torch.tensor([0, 4, 8, 12]).view(1, 1, 1, 4, 1, 1)) & 15  # [N/16, G, c, t, i, e]
    q = q.permute(0, 4, 1, 2, 3, 5).reshape(blocks * BLOCK, G * GROUP)
    sz = w[..., 256:].contiguous().view(torch.bfloat16).reshape(blocks, G, 2, BLOCK).permute(2, 0, 3, 1)
    sz = sz.reshape(2, blocks * BLOCK, G)
    return q, sz[0], sz[1]
