"""BitNet b1.58 linear layer: ternary weights packed 2 bits each, int8 per-token activations.

Storage mirrors the Hugging Face `microsoft/bitnet-b1.58-2B-4T` checkpoint (transformers'
`integrations/bitnet.py`): `weight` is uint8 `[out/4, in]`; stored value = ternary + 1 in {0, 1, 2};
the output rows are split in four contiguous blocks of `out/4` rows and block `i` sits in bits
`2i..2i+1` of each byte. `weight_scale` is one number per projection. transformers has two
conventions and we keep whichever the checkpoint uses, with its arithmetic order, so logits match:
`autobitlinear` (the 2B-4T checkpoint): `W0 = ternary * weight_scale` (the absmean), and
`bitlinear`: `W0 = ternary / weight_scale` with an integer-activation matmul.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import triton_kernels

VALUES_PER_BYTE = 4


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """q: int tensor in {-1, 0, 1} of shape [out, in] -> uint8 [out/4, in]."""
    out_features = q.shape[0]
    if out_features % VALUES_PER_BYTE:
        raise ValueError(f"BitLinear needs out_features divisible by 4, got {out_features}")
    rows = out_features // VALUES_PER_BYTE
    u = (q.to(torch.int16) + 1).to(torch.uint8)  # [out, in] in {0,1,2}
    packed = torch.zeros((rows, *q.shape[1:]), dtype=torch.uint8, device=q.device)
    for i in range(VALUES_PER_BYTE):
        packed |= u[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [out/4, in] -> ternary values in `dtype`, shape [out, in]."""
    blocks = [(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)]
    return torch.cat(blocks, dim=0).to(dtype) - 1


_SHIFTS = {}


def unpack_ternary_int8(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/4, in] -> int8 ternary [out, in] in one broadcast shift, mask and subtract."""
    shifts = _SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _SHIFTS[packed.device] = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)[:, None, None]
    w = (packed.unsqueeze(0) >> shifts) & 3  # [4, out/4, in]: block i = rows i*out/4 ...
    return w.view(torch.int8).sub_(1).reshape(-1, packed.shape[-1])


def absmean_ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 weight quantiser: per-tensor absmean scale, round-and-clip to {-1, 0, 1}.

    Returns (ternary int8 [out, in], scale [1] float32) with weight ~= ternary * scale.
    """
    w = weight.float()
    scale = w.abs().mean().clamp(min=1e-5)
    q = (w / scale).round().clamp(-1, 1).to(torch.int8)
    return q, scale.reshape(1)


def ternarize_ste(weight: torch.Tensor) -> torch.Tensor:
    """Fake-quantised weight for quantisation-aware training: forward sees the ternary weight,
    backward passes the gradient straight through to the latent float weight."""
    q, scale = absmean_ternarize(weight)
    wq = (q.float() * scale).to(weight.dtype)
    return weight + (wq - weight).detach()


def quantize_activations_int(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 levels (as floats, STE gradient) and their scale 127/absmax."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xs = x * scale
    return xs + ((xs.round().clamp(-128, 127)) - xs).detach(), scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 fake-quantisation with a straight-through estimator.

    Computed in float32 exactly as transformers' ActQuant so logits match the reference; the
    STE keeps gradients flowing to earlier layers, which DoRA training on a BitNet backbone needs.
    """
    xf = x.float()
    scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    xq = ((xf * scale).round().clamp(-128, 127) / scale).to(x.dtype)
    return x + (xq - x).detach()


class BitLinear(nn.Module):
    """Frozen ternary linear layer (weights are buffers: nothing here is trainable)."""

    # Inference on CPU through the int8 kernel (W2A8; Engine.load(quant="int8") on a ternary
    # checkpoint turns it on). Off by default: the float path reproduces transformers' arithmetic
    # order, so logits match its BitNet model to 1e-6; the exact integer product differs from that
    # float rounding and, through a flipped activation rounding, by up to ~5e-3 in logits.
    int8_kernel = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None,
                 divide_scale: bool = False):
        super().__init__()
        self.divide_scale = divide_scale  # transformers' "bitlinear" checkpoint convention
        if out_features % VALUES_PER_BYTE:
            raise ValueError(f"BitLinear needs out_features divisible by 4, got {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "weight", torch.zeros(out_features // VALUES_PER_BYTE, in_features, dtype=torch.uint8, device=device)
        )
        self.register_buffer("weight_scale", torch.ones(1, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "BitLinear":
        """Ternarise a dense linear layer (absmean). Lossy: used for the `ternary=True` load option."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        q, scale = absmean_ternarize(w)
        layer.weight.copy_(pack_ternary(q))
        layer.weight_scale.copy_(scale.to(w.dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantised W0 [out, in] = ternary * weight_scale."""
        dtype = dtype or self.weight_scale.dtype
        if self.divide_scale:
            return unpack_ternary(self.weight, dtype) / self.weight_scale.to(dtype)
        return unpack_ternary(self.weight, dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        int8_here = x.device.type == "cpu" or (x.is_cuda and triton_kernels.available())  # _int_mm / Triton
        if self.int8_kernel and not torch.is_grad_enabled() and int8_here:
            return self._forward_int8(x)
        w = unpack_ternary(self.weight, x.dtype)  # [out, in] in {-1, 0, 1}
        if self.divide_scale:
            xq, x_scale = quantize_activations_int(x)  # integer levels: the matmul is exact
            y = F.linear(xq, w) / (self.weight_scale.to(x.dtype) * x_scale)
        else:
            y = F.linear(quantize_activations(x), w) * self.weight_scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        """Inference on CPU: int8 activation levels x ternary weights unpacked to int8 per call
        (three vectorised ops on the packed bytes; only the 2-bit form stays resident) and one
        int8 x int8 -> int32 matmul. The integer product is exact, so this equals the float path
        up to the float rounding of the final scaling."""
        if x.is_cuda and triton_kernels.available():  # CUDA: the Triton W2A8 kernel, same result
            return triton_kernels.bitlinear_forward(self, x)
        shape = x.shape
        xf = x.reshape(-1, shape[-1]).float()
        x_scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)  # [M, 1]
        xq = (xf * x_scale).round_().clamp_(-128, 127).to(torch.int8)
        w = unpack_ternary_int8(self.weight)  # [out, in] int8
        acc = torch._int_mm(xq, w.t()).float()  # [M, out] exact integer sums
        ws = self.weight_scale.float()
        y = acc / (ws * x_scale) if self.divide_scale else acc * (ws / x_scale)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=2bit"


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """W0 of any backbone linear as the float tensor the DoRA norm needs. Quantised layers swapped
    in later (int8/int4/ternary kernels) expose `dense_weight()`; nn.Linear has `.weight`."""
    if hasattr(linear, "dense_weight"):
        return linear.dense_weight()
    return linear.weight
