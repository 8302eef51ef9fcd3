"""BitNet b1.58 served: ternary weights packed 2 bits each in our kernel's layout (ternary.cpp, op
`torch.ops.r3mes_ternary.ternary_mm`), int8 per-token activations, exact int32 sums.

`pack_model(model)` runs once at load (Engine.load with quant "ternary", the default for ternary
checkpoints): every BitLinear of the decoder becomes a TernaryLinear in the kernel's layout, q|k|v
and gate|up fused into one product each (they share their input, hence its int8 levels), the
per-projection modules kept as row views where adapters expect them. The checkpoint's own packing
is dropped: two bits a weight stay resident, plus one float scale per output row.

- `kernel()`: which instruction set runs the product ("avx512-vnni", "avx2"), or None where
  neither builds or runs; then TernaryLinear unpacks to int8 and multiplies with PyTorch's
  `_int_mm`: the same integers, the same result, many times slower.
- `pack(t)` / `unpack(w, n, k)`: int8 ternary [N, K] to the kernel's layout (ternary.cpp's header)
  and back.

R3MES_TERNARY_KERNEL=aten keeps PyTorch's product even where ours runs (A/B benchmarks, tests).
"""

import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native
from .bitlinear import BitLinear, quantize_activations, unpack_ternary_int8

SOURCE = Path(__file__).with_name("ternary.cpp")
BLOCK = 16  # outputs per block
GROUP = 16  # inputs per group
GROUP_BYTES = 64


@functools.cache
def kernel() -> str | None:
    if os.environ.get("R3MES_TERNARY_KERNEL", "") == "aten":
        return None
    # No -m flags: each instruction set's functions carry their own target, chosen at run time.
    if not native.load(SOURCE, [], "ternary kernel"):
        return None
    isa = torch.ops.r3mes_ternary.isa()
    if not isa:
        return None

    @torch.library.register_fake("r3mes_ternary::ternary_mm")
    def _(x, w, scale, isa=""):
        return x.new_empty(x.shape[0], w.shape[0] * BLOCK)

    return isa


def pack(t: torch.Tensor) -> torch.Tensor:
    """int ternary [N, K] in {-1, 0, 1} -> uint8 [ceil(N/16), ceil(K/16), 64]; padding weighs 0."""
    n, k = t.shape
    u = torch.ones(-n % BLOCK + n, -k % GROUP + k, dtype=torch.uint8)
    u[:n, :k] = (t.to(torch.int16) + 1).to(torch.uint8)
    blocks, groups = u.shape[0] // BLOCK, u.shape[1] // GROUP
    # [block, j, group, c, b] -> [block, group, j, b, c]: byte 4j + b, bits 2c
    u = u.view(blocks, BLOCK, groups, 4, 4).permute(0, 2, 1, 4, 3)
    packed = u[..., 0] | u[..., 1] << 2 | u[..., 2] << 4 | u[..., 3] << 6
    return packed.reshape(blocks, groups, GROUP_BYTES).contiguous()


def unpack(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The kernel's layout -> int8 ternary [n, k]."""
    blocks, groups, _ = w.shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=w.device)
    u = (w.view(blocks, groups, BLOCK, 4, 1) >> shifts) & 3  # [block, group, j, b, c]
    t = u.permute(0, 2, 1, 4, 3).reshape(blocks * BLOCK, groups * GROUP)[:n, :k]
    return t.view(torch.int8) - 1


class TernaryLinear(nn.Module):
    """y = (t q) * scale / xs per output row: t ternary in the kernel's layout, q the int8 levels of
    x per token (BitNet's absmax), xs their scale. With autograd on (DoRA training on a BitNet
    backbone) the product is transformers' float one with the straight-through estimator."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", packed)  # uint8 [ceil(out/16), ceil(in/16), 64]
        self.register_buffer("scale", scale)  # float32 [16 ceil(out/16)], 0 on padding rows
        self.register_buffer("bias", bias)  # None registers nothing and reads back as None
        # Decided once, here: the compiled decode step traces forward and must not look it up.
        self.isa = kernel()

    @classmethod
    def from_ternary(cls, t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> "TernaryLinear":
        """t int8 [out, in], scale float32 [out] (W0 = t * scale row by row)."""
        n, k = t.shape
        rows = torch.zeros(-n % BLOCK + n, dtype=torch.float32)
        rows[:n] = scale.float()
        return cls(pack(t), rows, k, n, None if bias is None else bias.detach().float().clone())

    @staticmethod
    def ternary_of(layer: BitLinear) -> tuple[torch.Tensor, torch.Tensor]:
        """A BitLinear's ternary matrix and its per-row scale in the multiply convention."""
        ws = layer.weight_scale.float().reshape(())
        scale = 1 / ws if layer.divide_scale else ws
        return unpack_ternary_int8(layer.weight), scale.expand(layer.out_features)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> "TernaryLinear":
        t, scale = cls.ternary_of(layer)
        return cls.from_ternary(t, scale, layer.bias)

    def can_view_rows(self, start: int, end: int) -> bool:
        return start % BLOCK == 0 and (end - start) % BLOCK == 0

    def rows(self, start: int, end: int) -> "TernaryLinear":
        """Output rows [start, end) as a module sharing this one's storage."""
        if not self.can_view_rows(start, end):
            raise ValueError(f"ternary rows [{start}, {end}) do not fall on {BLOCK}-row blocks")
        bias = None if self.bias is None else self.bias[start:end]
        return TernaryLinear(self.weight[start // BLOCK:end // BLOCK], self.scale[start:end], self.in_features,
                             end - start, bias)

    def ternary(self) -> torch.Tensor:
        return unpack(self.weight, self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return self.ternary().float() * self.scale[: self.out_features, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if torch.is_grad_enabled():
            y = F.linear(quantize_activations(x), self.ternary().to(x.dtype)) * self.scale[: self.out_features].to(x.dtype)
        else:
            x2 = x.reshape(-1, shape[-1]).float()
            if self.isa is not None and x.device.type == "cpu":
                y = torch.ops.r3mes_ternary.ternary_mm(x2, self.weight, self.scale)
            else:
                y = self._product_aten(x2)
            if y.shape[-1] != self.out_features:
                y = y[:, : self.out_features]
            y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _product_aten(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's arithmetic with PyTorch's ops (the int8 levels, exact integer sums, the same
        float scaling): unpacks the weights on every call."""
        x_scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        q = (x * x_scale).round_().clamp_(-128, 127).to(torch.int8)
        acc = torch._int_mm(q, self.ternary().t())
        return acc.float() * (self.scale[None, : self.out_features] / x_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ternary 2-bit packed "
                f"({self.isa or 'PyTorch'} kernel)")


def _fuse(parent: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """One TernaryLinear for projections sharing their input; the parts become its row views."""
    parts = [getattr(parent, n) for n in names]
    pairs = [TernaryLinear.ternary_of(p) for p in parts]
    biases = [p.bias for p in parts]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    fused = TernaryLinear.from_ternary(torch.cat([t for t, _ in pairs]), torch.cat([s for _, s in pairs]), bias)
    setattr(parent, fused_name, fused)
    start = 0
    for name, part in zip(names, parts):
        end = start + part.out_features
        # Rows that do not fall on blocks of 16 get their own copy (tiny test models only).
        view = fused.rows(start, end) if fused.can_view_rows(start, end) else TernaryLinear.from_bitlinear(part)
        setattr(parent, name, view)
        start = end


@torch.no_grad()
def pack_model(model: nn.Module, fuse: bool = True) -> nn.Module:
    """Every BitLinear of the decoder -> TernaryLinear, in place, before any adapter is installed."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if fuse:
            _fuse(attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
            _fuse(mlp, ("gate_proj", "up_proj"), "gate_up_proj")
        for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                child = getattr(parent, name)
                if isinstance(child, BitLinear):
                    setattr(parent, name, TernaryLinear.from_bitlinear(child))
    return model
