"""Speed passes applied at load: fused projections and weight-only quantisation (gpt-fast style).

Both walk the module tree and swap modules; the decoder's forward does not change shape, and DoRA
keeps working because every backbone linear still answers `dense_weight()` (the W0 its norms
need) and the per-projection modules stay where adapters expect them (HF module paths).

- `fuse_projections`: one `qkv_proj` (rows q|k|v) and one `gate_up_proj` (rows gate|up) per layer.
  The per-projection modules become row *views* of the fused weight (no second copy); they stay
  where adapters expect them, and a DoRA wrapper adds its low-rank paths to its rows of the fused
  product (`DoraLinear.combine`), so adapters never cost a second backbone product.
- `optimize_model(model, "ternary")` on a BitNet b1.58 model: its BitLinears repacked for our
  ternary kernel (ternary.pack_model, fused q|k|v and gate|up) and an int4 head.
- `quantize_model(model, "int8" | "int4")`: every decoder projection and the lm_head become
  weight-only quantised linears: int8 on PyTorch's `_weight_int8pack_mm`, int4 on our
  AVX512-BF16 kernel (int4mm) where the CPU has it, else PyTorch's `_weight_int4pack_mm_for_cpu`.
  Activations enter those kernels in bfloat16 (the kernels'
  fast path here; float32 activations take a scalar path that is 10-100x slower) and the result
  is cast back, so the rest of the model (norms, attention, residual stream) keeps its dtype.
  The embedding lookup stays exact (it reads one row per token).
"""

import torch
import torch.nn as nn

from . import int4mm, ternary

INT4_GROUP_SIZE = 32
QUANT_MODES = (None, "int8", "int4", "ternary")
# The vocabulary product of a ternary backbone (BitNet keeps its head in 16 bits): quantised like
# the dense default's, so that a token reads the body's two bits a weight plus a head of five
# rather than sixteen.
TERNARY_HEAD_QUANT = "int4"


class Int8Linear(nn.Module):
    """W ~= q * scale per output row, q int8 (symmetric absmax)."""

    def __init__(self, weight_q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q)  # int8 [out, in]
        self.register_buffer("scales", scales)  # bf16 [out]
        self.register_buffer("bias", bias)  # None registers nothing and reads back as None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        w = w.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(torch.bfloat16), None if bias is None else bias.detach().clone())

    def rows(self, start: int, end: int) -> "Int8Linear":
        """Output rows [start, end) as a module sharing this one's storage."""
        return Int8Linear(self.weight[start:end], self.scales[start:end],
                          None if self.bias is None else self.bias[start:end])

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.scales)
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int4Linear(nn.Module):
    """W ~= (q - 8) * scale + zero per group of INT4_GROUP_SIZE inputs (asymmetric, as gpt-fast).

    Two kernels for the same numbers: ours (int4mm: AVX512-BF16, 1.6-2.3x PyTorch's at one row,
    ~2x at a batch's 8 rows) where the CPU has it and the group is 32, else PyTorch's
    `_weight_int4pack_mm_for_cpu`. `scales_and_zeros` None marks ours (`on_int4mm`): its scales
    live inside `weight` (int4mm.pack_int4)."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor | None, in_features: int,
                 group_size: int, bias: torch.Tensor | None = None, out_features: int | None = None):
        super().__init__()
        # Both kernels want output rows in multiples of 16: extra rows are zero padding.
        rows = packed.shape[0] * (int4mm.BLOCK if scales_and_zeros is None else 1)
        self.out_features = rows if out_features is None else out_features
        self.in_features, self.group_size = in_features, group_size
        # ours: uint8 [out/16, in/32, 320]; PyTorch's: uint8 [out, in/2] (its CPU int4pack layout)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # PyTorch's: bf16 [in/gs, out, 2]
        self.register_buffer("bias", bias)  # None registers nothing and reads back as None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None = None,
                    group_size: int = INT4_GROUP_SIZE) -> "Int4Linear":
        w = w.detach().float()
        real_out, in_f = w.shape
        if in_f % group_size:
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {in_f}")
        w = torch.nn.functional.pad(w, (0, 0, 0, -real_out % 16))
        out_f = w.shape[0]
        g = w.reshape(out_f, in_f // group_size, group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
        zero = lo + 8 * scale
        bias = None if bias is None else bias.detach().clone()
        if group_size == int4mm.GROUP and w.device.type == "cpu" and int4mm.available():
            return cls(int4mm.pack_int4(q, scale[..., 0], zero[..., 0]), None, in_f, group_size, bias, real_out)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [in/gs, out, 2]
        return cls(packed, sz, in_f, group_size, bias, real_out)

    @property
    def on_int4mm(self) -> bool:
        """Whether the products run on our kernel (int4mm) rather than PyTorch's."""
        return self.scales_and_zeros is None

    @property
    def row_block(self) -> int:
        """Rows viewable together: ours packs blocks of 16 outputs, PyTorch's interleaves 64."""
        return int4mm.BLOCK if self.on_int4mm else 64

    def can_view_rows(self, start: int, end: int) -> bool:
        return start % self.row_block == 0 and (end - start) % self.row_block == 0

    def rows(self, start: int, end: int) -> "Int4Linear":
        if not self.can_view_rows(start, end):
            raise ValueError(f"int4 rows [{start}, {end}) do not fall on {self.row_block}-row blocks")
        bias = None if self.bias is None else self.bias[start:end]
        if self.on_int4mm:
            return Int4Linear(self.weight[start // int4mm.BLOCK:end // int4mm.BLOCK], None, self.in_features,
                              self.group_size, bias)
        return Int4Linear(self.weight[start:end], self.scales_and_zeros[:, start:end].contiguous(), self.in_features,
                          self.group_size, bias)

    def dense_weight(self) -> torch.Tensor:
        if self.on_int4mm:
            q, scale, zero = int4mm.unpack_int4(self.weight)
            groups = (q.float() - 8).view(q.shape[0], -1, self.group_size)
            w = groups * scale.float()[..., None] + zero.float()[..., None]
            return w.view(q.shape)[: self.out_features]
        # The packed layout is the kernel's own; the product with the identity reads it back (W^T).
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight.device)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, self.scales_and_zeros)
        return wt.t()[: self.out_features].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.on_int4mm:
            y = int4mm.int4_mm(x2, self.weight)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "AVX512-BF16" if self.on_int4mm else "PyTorch"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 weight-only (group {self.group_size}, {kernel} kernel)")


QUANTIZERS = {"int8": Int8Linear.from_weight, "int4": Int4Linear.from_weight}


def _dense_rows(linear: nn.Linear, start: int, end: int) -> nn.Linear:
    view = nn.Linear(linear.in_features, end - start, bias=linear.bias is not None,
                     device="meta")  # parameters replaced by views below; meta allocates nothing
    view.weight = nn.Parameter(linear.weight.detach()[start:end], requires_grad=False)
    if linear.bias is not None:
        view.bias = nn.Parameter(linear.bias.detach()[start:end], requires_grad=False)
    return view


def _make(weight: torch.Tensor, bias: torch.Tensor | None, quant: str | None) -> nn.Module:
    if quant is None:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        return lin
    return QUANTIZERS[quant](weight, bias)


def _rows(module: nn.Module, start: int, end: int) -> nn.Module:
    return _dense_rows(module, start, end) if isinstance(module, nn.Linear) else module.rows(start, end)


def _fuse(parent: nn.Module, names: tuple[str, ...], fused_name: str, quant: str | None) -> None:
    parts = [getattr(parent, n) for n in names]
    weight = torch.cat([p.weight.detach() for p in parts], dim=0)
    biases = [p.bias for p in parts]
    bias = torch.cat([b.detach() for b in biases], dim=0) if all(b is not None for b in biases) else None
    fused = _make(weight, bias, quant)
    setattr(parent, fused_name, fused)
    start = 0
    for name, part in zip(names, parts):
        end = start + part.out_features
        if hasattr(fused, "can_view_rows") and not fused.can_view_rows(start, end):
            # Quantisation groups run along the inputs, so quantising the part alone gives exactly
            # the fused module's rows; only the storage is not shared (small models only).
            setattr(parent, name, _make(part.weight, part.bias, quant))
        else:
            setattr(parent, name, _rows(fused, start, end))
        start = end


@torch.no_grad()
def optimize_model(model: nn.Module, quant: str | None = None, fuse: bool = True) -> nn.Module:
    """Fuse projections and/or quantise a freshly loaded model in place (before any adapter is
    installed: DoRA's g scales are computed from the backbone it will run with)."""
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if model.config.ternary:
        if quant not in (None, "ternary"):
            raise ValueError(f"weight-only {quant} applies to dense checkpoints; this model is ternary (BitLinear)")
        if quant == "ternary":
            ternary.pack_model(model, fuse=fuse)
            model.lm_head = _make(model.lm_head.weight, None, TERNARY_HEAD_QUANT)
            model.quant = quant
        return model  # quant None: BitLinear's float path, transformers' arithmetic order
    if quant == "ternary":
        raise ValueError("quant 'ternary' runs ternary (BitNet b1.58) checkpoints; this model is dense")
    if getattr(model, "adapter_context", None) is not None and model.adapter_context.names:
        raise ValueError("optimize_model must run before adapters are loaded")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if fuse:
            _fuse(attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj", quant)
            _fuse(mlp, ("gate_proj", "up_proj"), "gate_up_proj", quant)
        elif quant is not None:
            for parent, name in ((attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (mlp, "gate_proj"),
                                 (mlp, "up_proj")):
                lin = getattr(parent, name)
                setattr(parent, name, _make(lin.weight, lin.bias, quant))
        if quant is not None:
            for parent, name in ((attn, "o_proj"), (mlp, "down_proj")):
                lin = getattr(parent, name)
                setattr(parent, name, _make(lin.weight, lin.bias, quant))
    if quant is not None:
        # The vocabulary product is the largest matrix (49152 x 576 on SmolLM2); a tied embedding
        # keeps its exact table for lookups, the lm_head gets its own quantised copy.
        model.lm_head = _make(model.lm_head.weight, None, quant)
    model.quant = quant
    return model


def quantised(model: nn.Module) -> bool:
    """Whether optimize_model gave this model int8, int4 or packed ternary products."""
    return any(isinstance(m, (Int8Linear, Int4Linear, ternary.TernaryLinear)) for m in model.modules())


def linear_weight_bits(model: nn.Module) -> float:
    """Resident bits per weight over the decoder projections (BitNet check: <= 2.1 for packed)."""
    bits = weights = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                m = getattr(parent, name, None)
                if m is None:
                    continue
                m = getattr(m, "base_layer", m)
                weights += m.in_features * m.out_features
                bits += 8 * sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
                bits += 8 * sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return bits / weights


