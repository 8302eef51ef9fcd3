"""DoRA adapters, PEFT-compatible, with many adapters resident and per-sequence mixtures.

For adapter i on a linear with frozen weight W0:

    W'_i = m_i * (W0 + s_i B_i A_i) / ||W0 + s_i B_i A_i||_row,   g_i = m_i / ||W0 + s_i B_i A_i||_row

A sequence with mixture weights w (sum 1) computes

    y = (sum_i w_i g_i) * (W0 x) + sum_i w_i g_i s_i B_i A_i x

so the whole batch shares ONE backbone product per layer; the low-rank paths of the resident
adapters are stacked and contracted against the batch's [B, N] mixture matrix (Punica/S-LoRA
style gather), never a Python loop over sequences. g_i is computed once at load.
"""

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from . import int4mm, triton_kernels
from .bitlinear import dense_weight
from .errors import AdapterError, MixtureError, UnknownAdapter
from .speed import Int4Linear

PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class AdapterContext:
    """Shared by every DoraLinear of one model: the resident adapter order and, while a forward
    runs, the batch's mixture restricted to the adapters it actually uses."""

    def __init__(self):
        self.names: list[str] = []
        self.active: torch.Tensor | None = None  # [n] indices into `names` used by this batch
        self.weights: torch.Tensor | None = None  # [B, n] mixture over the active adapters
        self.rest: torch.Tensor | None = None  # [B, 1] = 1 - sum(weights): backbone share of adapter-free rows
        self.training: str | None = None  # adapter trained live (norm recomputed, detached)
        self.version = 0  # bumped whenever the mixture changes (DoraLinear caches key on it)
        self.stacks_version = 0  # bumped whenever a DoraLinear rebuilds its stacks (adapter_layouts)
        self.layouts = None  # (stacks_version, dtype, {adapter index: its factors as the graph lays them out})
        self._last = None  # (mixture, active, weights, rest) of the last mixture
        self.decode_lowrank = OrderedDict()  # key -> tensors of the compiled decode step, most recent last

    def set_mixture(self, mixture: torch.Tensor | None) -> None:
        """Called around every forward. Decode steps usually repeat the previous step's mixture, so
        an unchanged mixture keeps its `version` and every DoraLinear reuses what it derived from
        it (g_mix, per-rank weights) instead of recomputing it 7 x n_layers times per token."""
        if mixture is None or mixture.numel() == 0:
            self.active = self.weights = None
            return
        last = self._last
        if last is not None and last[0].shape == mixture.shape and torch.equal(last[0], mixture):
            self.active, self.weights, self.rest = last[1:]
            return
        self._last = None
        self.version += 1
        used = (mixture > 0).any(dim=0).nonzero().squeeze(-1)  # [n]
        if used.numel() == 0:
            self.active = self.weights = None
            return
        self.active, self.weights = used, mixture[:, used]
        self.rest = 1 - self.weights.sum(-1, keepdim=True)
        self._last = (mixture.clone(), self.active, self.weights, self.rest)


@dataclass
class AdapterSpec:
    """One PEFT adapter as read from disk: per module path, (A [r, in], B [out, r], m [out])."""

    r: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: list[str] | str
    base_model: str | None
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def use_triton(x: torch.Tensor) -> bool:
    """CUDA inference takes the fused Triton kernels (no autograd through them)."""
    return x.is_cuda and not torch.is_grad_enabled() and triton_kernels.available()


class DoraLinear(nn.Module):
    """Wraps a backbone linear (`base_layer`, dense or BitLinear) and adds the DoRA paths.

    Per adapter name it keeps PEFT's parameters (`lora_A`, `lora_B`, `lora_magnitude_vector`);
    for inference it keeps stacks over the context's adapter order:
    `stack_A` [N, r, in], `stack_B` [N, out, r] already multiplied by g_i * s_i, `stack_g` [N, out].
    """

    def __init__(self, base_layer: nn.Module, context: AdapterContext):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.context = context
        self.stack_A = self.stack_B = self.stack_g = self.flat_A = self.flat_B = None
        self.mix_plan = None  # (key, plan) for the context's current mixture (see mixture_plan)
        self._g: dict[str, tuple] = {}  # adapter -> (versions of its A, B, m, g = m / ||W0 + s B A||)

    # -- adapter bookkeeping -------------------------------------------------------------------
    def add(self, name: str, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, scaling: float) -> None:
        dtype = torch.float32  # adapter params stay float32: they are tiny and trained in fp32
        self.lora_A[name] = nn.Parameter(A.to(dtype), requires_grad=False)
        self.lora_B[name] = nn.Parameter(B.to(dtype), requires_grad=False)
        self.lora_magnitude_vector[name] = nn.Parameter(m.to(dtype), requires_grad=False)
        self.scaling[name] = scaling
        self._g.pop(name, None)

    def remove(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self._g.pop(name, None)

    def weight_norm(self, name: str) -> torch.Tensor:
        """||W0 + s B A|| per output row (PEFT's get_weight_norm), in float32."""
        W0 = dense_weight(self.base_layer).float()
        delta = self.lora_B[name].float() @ self.lora_A[name].float()  # [out, in]
        return torch.linalg.norm(W0 + self.scaling[name] * delta, dim=1)

    def magnitude_scale(self, name: str) -> torch.Tensor | float:
        """g = m / ||W0 + s B A|| of one adapter, kept until its factors change (training updates
        them in place, which bumps their version counters): the norm needs the dense backbone
        weight, which for int4 means dequantising it (~6 ms a projection), and every rebuild (each
        adapter load) needs g for every resident adapter."""
        A, B, m = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name]
        key = (A._version, B._version, m._version, self.scaling[name])
        cached = self._g.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        g = m / self.weight_norm(name) if m is not None and m.numel() else 1.0
        self._g[name] = (key, g)
        return g

    @torch.no_grad()
    def rebuild(self) -> None:
        """Precompute g_i and the stacked low-rank factors in the context's adapter order.

        A module that an adapter does not target behaves as that adapter with g = 1 and B = 0, so
        the mixture formula holds for every module without special cases.
        """
        self.context.version += 1  # cached mixture plans are stale
        self.context.stacks_version += 1
        names = self.context.names
        if not names:
            self.stack_A = self.stack_B = self.stack_g = self.flat_A = self.flat_B = None
            return
        base = self.base_layer
        # The stacks follow the activations' dtype: the weight's for dense layers, the scale's for
        # BitLinear, float32 for the weight-only quantised ones (they take and return it).
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else getattr(base, "weight_scale", torch.ones(1)).dtype
        dev = self.lora_A[next(iter(self.lora_A))].device if len(self.lora_A) else None
        r_max = max([self.lora_A[n].shape[0] for n in names if n in self.lora_A] or [1])
        A = torch.zeros(len(names), r_max, self.in_features, device=dev)
        B = torch.zeros(len(names), self.out_features, r_max, device=dev)
        g = torch.ones(len(names), self.out_features, device=dev)
        for i, n in enumerate(names):
            if n not in self.lora_A:
                continue
            r = self.lora_A[n].shape[0]
            g[i] = self.magnitude_scale(n)
            A[i, :r] = self.lora_A[n]
            B[i, :, :r] = self.lora_B[n] * (g[i] * self.scaling[n])[:, None]
        self.stack_A, self.stack_B, self.stack_g = A.to(dtype), B.to(dtype), g.to(dtype)
        # Flattened over (adapter, rank) for the two-matmul forward: A [N*r, in], B [N*r, out].
        self.flat_A = self.stack_A.flatten(0, 1)
        self.flat_B = self.stack_B.transpose(1, 2).flatten(0, 1).contiguous()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(x, self.base_layer(x))  # [B, T, out]: the one backbone product

    def combine(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add this projection's DoRA mixture to its backbone output `y` = base_layer(x), which the
        caller may have computed as rows of a fused q|k|v or gate|up product (one backbone product
        per layer whether or not adapters take part). Without autograd, `y` is updated in place."""
        ctx = self.context
        if ctx.training is not None and ctx.training in self.lora_A:
            return self._forward_live(x, y, ctx.training)
        if ctx.weights is None or self.stack_A is None:
            return y
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            y = y - bias
        if use_triton(x):
            y = self._lowrank_triton(x, y)
        else:
            y = apply_mixture(mixture_plan(ctx, (self,), x.dtype, self, bias_free=True), x, y)  # stack_A: never ()
        return y if bias is None else y + bias

    def _lowrank_triton(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """combine()'s mixture on CUDA: the low-rank paths of every sequence in one Triton shrink and
        one expand launch that also applies g_mix (triton_kernels.py). The active adapters are
        gathered inside the kernels, from the resident stacks."""
        ctx = self.context
        w = ctx.weights.to(x.device, torch.float32)  # [B, n]
        g_mix = torch.addmm(ctx.rest.to(x.device, torch.float32), w, self.stack_g[ctx.active].float())  # [B, out]
        return triton_kernels.dora_mixture(x, y.contiguous(), self.flat_A, self.flat_B, self.stack_A.shape[1],
                                           ctx.active, w, g_mix)

    def _forward_live(self, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        # Training: gradients reach A, B and m; the norm is detached (DoRA paper sec. 4.3, as PEFT).
        A, B, m, s = self.lora_A[name], self.lora_B[name], self.lora_magnitude_vector[name], self.scaling[name]
        g = (m / self.weight_norm(name).detach()).to(x.dtype)  # [out]
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            y = y - bias
        low = (x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()  # [B, T, out]
        y = g * y + g * s * low
        return y if bias is None else y + bias


def mixture_plan(ctx: AdapterContext, modules, dtype: torch.dtype, owner: nn.Module, bias_free: bool = False):
    """What the context's current mixture needs from these projections (one, or several sharing
    their input and one fused backbone product), built once per mixture and cached on `owner`
    (its `mix_plan` attribute):

    - `A_t` [in, R]: every active adapter's A of every projection side by side (R = sum of n*r),
      so ONE shrink product serves the whole group;
    - `parts`: per adapted projection, its output columns, its rank columns and its B factors
      [n*r, out] already scaled by g_i * s_i (and by the mixture weights when every row of the batch
      uses the same mixture, the common case; otherwise `w_r` [B, R] weighs the shrink per row);
    - `g_mix` [B or 1, sum out]: sum_i w_i g_i, 1 for rows without adapters and for projections no
      adapter targets.

    The expand is one product per projection straight into its columns of `y`, never a
    block-diagonal B (at decode its zeros cost as much memory traffic as the backbone).
    `()` when no projection of the group has adapters; None when (groups only) one has a bias: the
    caller then combines projection by projection.
    """
    key = (ctx.version, dtype)
    cached = owner.mix_plan
    if cached is not None and cached[0] == key:
        return cached[1]
    if not bias_free and any(getattr(m.base_layer if isinstance(m, DoraLinear) else m, "bias", None) is not None
                             for m in modules):
        owner.mix_plan = (key, None)
        return None
    w = ctx.weights.to(dtype)  # [B, n]
    rest = ctx.rest.to(dtype)  # [B, 1]
    uniform = w.shape[0] == 1 or bool((w == w[:1]).all())
    if uniform:
        w, rest = w[:1], rest[:1]
    A_cols, parts, g_cols, w_cols = [], [], [], []
    col = rank = 0
    for m in modules:
        if isinstance(m, DoraLinear) and m.stack_A is not None:
            n, r = ctx.active.numel(), m.stack_A.shape[1]
            w_r = w.repeat_interleave(r, dim=1)  # [B, n*r]
            A_cols.append(m.stack_A[ctx.active].flatten(0, 1))  # [n*r, in]
            Bg = m.stack_B[ctx.active].transpose(1, 2).flatten(0, 1)  # [n*r, out]
            if uniform:
                Bg = Bg * w_r[0][:, None]
            else:
                w_cols.append(w_r)
            parts.append((col, col + m.out_features, rank, rank + n * r, Bg.contiguous()))
            g_cols.append(torch.addmm(rest, w, m.stack_g[ctx.active]))  # [B, out]
            rank += n * r
        else:
            g_cols.append(torch.ones(w.shape[0], m.out_features, dtype=dtype, device=w.device))
        col += m.out_features
    plan = () if not parts else (torch.cat(A_cols).t().contiguous(), parts, torch.cat(g_cols, dim=-1),
                                 None if uniform else torch.cat(w_cols, dim=-1))
    owner.mix_plan = (key, plan)
    return plan


def apply_mixture(plan, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y [B, T, out] (backbone output, no bias) -> g_mix * y + the weighted low-rank paths.
    Four kinds of op per group whatever its size: a shrink, (a per-row weighting), the g scale,
    one expand per projection accumulated in place."""
    A_t, parts, g_mix, w_r = plan
    rows = x.numel() // x.shape[-1]
    h = torch.mm(x.reshape(rows, x.shape[-1]), A_t)  # [B*T, R]
    if w_r is not None:
        h = h.view(x.shape[0], -1, h.shape[-1]).mul_(w_r[:, None, :]).view(rows, -1)
    if torch.is_grad_enabled():
        y = y * g_mix[:, None, :]  # a new tensor: autograd may have saved y
    else:
        y = y.contiguous().mul_(g_mix[:, None, :])
    flat = y.view(rows, y.shape[-1])
    for c0, c1, r0, r1, Bg in parts:
        flat[:, c0:c1].addmm_(h[:, r0:r1], Bg)
    return y


# The projection groups of a decoder layer as the compiled decode step takes their mixture:
# (module of the layer, projections sharing one input and one fused backbone product).
DECODE_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
                 ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
# The compiled step's B factors come in blocks of this many output columns: [out / LOWRANK_BLOCK,
# width, LOWRANK_BLOCK]. 32 bfloat16 columns are one 64-byte cache line, and the expand's loop
# keeps two AVX-512 accumulators instead of one: blocks of 16 cost a three-expert mixture ~1.3 ms a
# token, blocks of 32 ~0.85 (benchmarks/RESULTS.md, eleventh session).
LOWRANK_BLOCK = 32


# decode_lowrank keeps the layouts of this many recent mixtures (a lone three-expert one: 14.6 MB on
# SmolLM2; a batch's holds the factors of every adapter it uses): requests that alternate between a
# few experts or mixtures, as routed chats do, skip the ~3 ms of laying theirs out again.
DECODE_CACHE_SIZE = 4

# The compiled step's mixture width (its ranks summed per projection) is a multiple of this: one
# graph takes every width (a symbol), and the padding stays small.
WIDTH_STEP = 8


def adapter_layouts(model: nn.Module, active: list[int], dtype: torch.dtype) -> dict:
    """The factors of the resident adapters `active` (indices into the context's names) as
    decode_lowrank lays them out, each adapter's once per stack rebuild (cached on the context), so
    that a mixture is a few concatenations, not a copy per layer, projection and adapter (~30 ms
    for three adapters on SmolLM2, every new mixture; benchmarks/RESULTS.md, tenth session).

    Per adapter, per group of DECODE_GROUPS, per projection, over the layers: `A` [L, r, in] and
    `B` [L, out/32, r, 32] (scaled by g_i * s_i, dtype), zeros in the layers the adapter does not
    target, or both None when it targets the projection in no layer; and `g` [L, out] (g_i, 1
    where not targeted; the model's float dtype)."""
    ctx = model.adapter_context
    device = model.model.embed_tokens.weight.device
    if ctx.layouts is None or ctx.layouts[:2] != (ctx.stacks_version, dtype):
        ctx.layouts = (ctx.stacks_version, dtype, {})
    cache = ctx.layouts[2]
    layers = model.model.layers
    exact = model.model.embed_tokens.weight.dtype
    for i in active:
        if i in cache:
            continue
        name, groups = ctx.names[i], []
        for owner, names in DECODE_GROUPS:
            projections = []
            for n in names:
                mods = [getattr(getattr(layer, owner), n) for layer in layers]
                g = torch.stack([m.stack_g[i] if m.stack_g is not None else torch.ones(m.out_features, device=device)
                                 for m in mods]).to(exact)
                targeted = [m for m in mods if name in m.lora_A]
                if not targeted:
                    projections.append((None, None, g))
                    continue
                r = targeted[0].lora_A[name].shape[0]
                # (a module no adapter of rank >= r targets has narrower stacks: zeros of the full rank)
                A = torch.stack([m.stack_A[i, :r] if name in m.lora_A else m.stack_A.new_zeros(r, m.in_features)
                                 for m in mods]).to(dtype)  # [L, r, in]
                B = torch.stack([m.stack_B[i, :, :r] if name in m.lora_A else m.stack_B.new_zeros(m.out_features, r)
                                 for m in mods])  # [L, out, r]
                B = B.view(len(mods), -1, LOWRANK_BLOCK, r).transpose(2, 3).contiguous().to(dtype)
                projections.append((A, B, g))
            groups.append(projections)
        cache[i] = groups
    return cache


@torch.inference_mode()  # as the decode step runs (the graph guards on the tensors' dispatch keys)
def decode_lowrank(model: nn.Module, width: int, dtype: torch.dtype, zeros: bool = False, rows: int | None = None):
    """The adapter context's mixture of ONE sequence as the tensors that the compiled decode step
    takes (Engine.compile_decode), packed into two (pack_lowrank: (F, G)) from, per group of
    DECODE_GROUPS, stacked over layers,

    - `A` [L, P*W, in]: each projection's active A factors stacked, their ranks summed and padded
      with zeros to the mixture's width W (the largest sum on one projection, rounded up to a
      multiple of WIDTH_STEP: one r=8 expert 8, three of them 24; the graph takes W as a symbol,
      so every width is one graph and a lone expert reads a third of the bytes three do);
    - `Bg` [L, sum out/32, W, 32]: each projection's B scaled by g_i * s_i (rebuild) and by the
      mixture weight w_i, zero rows for the padding, in blocks of LOWRANK_BLOCK output columns,
      the group's projections one after another, so that the expand reads the group's factors as one
      sequential stream: the factors come from DRAM on every token (the int4 backbone streams
      through the caches between two uses), and a [W, out] layout, `W` short strided streams,
      decoded 2-6 % slower (benchmarks/RESULTS.md);
    - `g` [L, 1, sum out]: g_mix = 1 - sum w_i + sum_i w_i g_i, in the model's float dtype.

    `width`: the most W the caller takes (a wider mixture gives None: it decodes eagerly); with
    `zeros` (the shapes only: all-zero factors, g = 1, for the compile warm-up) W itself.

    `rows`: the mixtures of a BATCH of that many sequences instead (Transformer.decode_rows), the
    factors of every adapter the batch uses once, unweighted, plus per row: `g` [L, B, 1, sum out]
    and the weights `w` [B, P*W] of each rank column (the shrink is weighed per row); packed into
    three (F, G, Wt).

    `dtype` is the factors' (Engine.compile_decode: bfloat16 in the quantised modes, where it
    halves the bytes read per token; they are accumulated in float32). The same function as
    mixture_plan + apply_mixture, laid out for a graph (add_lowrank). None when this mixture
    cannot take that form: a width over `width`, a bias, a projection that is not wrapped or whose
    outputs are not whole blocks, a layer without fused q|k|v and gate|up products, a batch of
    another size. Built once per mixture (the context keeps the last DECODE_CACHE_SIZE) from each
    adapter's factors as adapter_layouts keeps them: a new three-expert mixture costs ~3-4 ms on
    SmolLM2."""
    ctx = model.adapter_context
    layers = model.model.layers
    if ctx is None or any(layer.self_attn.qkv_proj is None or layer.mlp.gate_up_proj is None for layer in layers):
        return None
    block = LOWRANK_BLOCK
    exact = model.model.embed_tokens.weight.dtype  # g and the mixture weights
    device = model.model.embed_tokens.weight.device
    n_rows = 1 if rows is None else rows
    L = len(layers)
    if not zeros:
        # A batch's step asks again every token (generate._decode_rows): the cache comes first.
        if ctx.weights is None or ctx.weights.shape[0] != n_rows or layers[0].self_attn.q_proj.stack_A is None:
            return None
        active = ctx.active.tolist()
        key = (ctx.stacks_version, width, dtype, rows, tuple(active), tuple(map(tuple, ctx.weights.tolist())))
        cached = ctx.decode_lowrank.get(key)
        if cached is not None:
            ctx.decode_lowrank.move_to_end(key)
            return cached
    for owner, names in DECODE_GROUPS:
        for layer in layers:
            for n in names:
                m = getattr(getattr(layer, owner), n)
                if (not isinstance(m, DoraLinear) or getattr(m.base_layer, "bias", None) is not None
                        or m.out_features % block):
                    return None
    if zeros:  # the shapes only, for the compile warm-up
        out = []
        for owner, names in DECODE_GROUPS:
            mods = [getattr(layers[0], owner).get_submodule(n) for n in names]
            sum_out = sum(m.out_features for m in mods)
            A = torch.zeros(L, len(names) * width, mods[0].in_features, dtype=dtype, device=device)
            B = torch.zeros(L, sum_out // block, width, block, dtype=dtype, device=device)
            g = torch.ones(L, n_rows, 1, sum_out, dtype=exact, device=device)
            w_cols = torch.zeros(n_rows, len(names) * width, dtype=exact, device=device)
            out.append((A, B, g[:, 0]) if rows is None else (A, B, g, w_cols))
        return pack_lowrank(out)
    w = ctx.weights.to(exact)  # [B, n]
    g_rest = ctx.rest.to(exact)  # [B, 1]
    layouts = adapter_layouts(model, active, dtype)
    # Each projection's rank columns: the active adapters that target it, in order, then zeros up
    # to the width (the largest sum on one projection, rounded up to a multiple of WIDTH_STEP).
    targets = [[[(j, layouts[i][gi][pi]) for j, i in enumerate(active) if layouts[i][gi][pi][0] is not None]
                for pi in range(len(names))] for gi, (_, names) in enumerate(DECODE_GROUPS)]
    most = max([sum(f[0].shape[1] for _, f in parts) for group in targets for parts in group] or [0])
    needed = WIDTH_STEP * max(1, -(-most // WIDTH_STEP))
    if needed > width:
        return None
    width = needed
    out = []
    for gi, (owner, names) in enumerate(DECODE_GROUPS):
        A_parts, B_parts, g_parts, w_parts = [], [], [], []
        for pi, n in enumerate(names):
            m = getattr(layers[0], owner).get_submodule(n)
            parts = targets[gi][pi]
            pad = width - sum(f[0].shape[1] for _, f in parts)
            A_parts += [f[0] for _, f in parts] + [torch.zeros(L, pad, m.in_features, dtype=dtype, device=device)]
            # the lone sequence's mixture weight folded into B; a batch weighs its rows' shrinks (w_cols)
            B_parts.append(torch.cat([f[1] if rows is not None else f[1] * w[0, j].to(dtype) for j, f in parts]
                                     + [torch.zeros(L, m.out_features // block, pad, block, dtype=dtype,
                                                    device=device)], dim=2))
            w_parts += [w[:, j:j + 1].expand(n_rows, f[0].shape[1]) for j, f in parts]
            w_parts.append(torch.zeros(n_rows, pad, dtype=exact, device=device))
            # g_mix = 1 - sum w_j + sum_j w_j g_j, per row: [L, B, out]
            g_all = torch.stack([layouts[i][gi][pi][2] for i in active])  # [n, L, out]
            g_parts.append(g_rest[None] + torch.einsum("bn,nlo->lbo", w, g_all))
        A = torch.cat(A_parts, dim=1)  # [L, P*W, in]
        B = torch.cat(B_parts, dim=1)  # [L, sum out/32, W, 32]
        g = torch.cat(g_parts, dim=-1)[:, :, None, :]  # [L, B, 1, sum out]
        if rows is None:
            out.append((A, B, g[:, 0]))
        else:
            out.append((A, B, g, torch.cat(w_parts, dim=1)))
    out = pack_lowrank(out)
    cache = ctx.decode_lowrank
    if any(k[0] != ctx.stacks_version for k in cache):  # laid out from factors since replaced
        cache.clear()
    cache[key] = out
    while len(cache) > DECODE_CACHE_SIZE:
        cache.popitem(last=False)
    return out


def lowrank_sizes(model: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """Per group of DECODE_GROUPS: (its projections, their input width, their output widths
    summed), as pack_lowrank lays a layer's factors out one group after another."""
    layer = model.model.layers[0]
    return tuple((len(names), getattr(layer, owner).get_submodule(names[0]).in_features,
                  sum(getattr(layer, owner).get_submodule(n).out_features for n in names))
                 for owner, names in DECODE_GROUPS)


def pack_lowrank(groups) -> tuple[torch.Tensor, ...]:
    """The groups of DECODE_GROUPS, (A [L, P*W, in], B [L, out/32, W, 32], g [L, (B,) 1, out]) and
    for a batch `w` [B, P*W], as the tensors the compiled step takes: the factors `F` [L, W, n]
    (per layer every group's A then its B, flat; W the mixture's width, a symbol of the graph,
    n = sum over groups of P*in + out), `G` [L, (B,) 1, sum out] and for a batch `Wt` [B, sum P, W].
    Two or three inputs instead of 12 or 16: dynamo's and AOT autograd's wrappers cost
    microseconds per tensor input and call, and each layer's factors are one stream
    (benchmarks/RESULTS.md, twelfth session)."""
    L, W = groups[0][1].shape[0], groups[0][1].shape[2]
    F = torch.cat([t.reshape(L, -1) for A, B, *_ in groups for t in (A, B)], dim=1).view(L, W, -1)
    G = torch.cat([group[2] for group in groups], dim=-1)
    if len(groups[0]) == 3:
        return F, G
    return F, G, torch.cat([w.view(w.shape[0], -1, W) for *_, w in groups], dim=1)


def unpack_lowrank(lowrank: tuple, layer: int, sizes) -> list[tuple]:
    """Layer `layer` of pack_lowrank's tensors (F, G[, Wt]) -> per group of DECODE_GROUPS
    (F, a_at, G, g_at, Wt, w_at): the element offsets in them where the group's A, g and rows'
    weights start (its B follows its A). lowrank_product reads them in place (a view per factor
    costs the compiled step microseconds per call, four calls a layer); lowrank_views makes the
    views. `sizes`: lowrank_sizes."""
    F, G = lowrank[0], lowrank[1]
    Wt = lowrank[2] if len(lowrank) > 2 else None
    W = F.shape[1]
    out, at, g_at, p_at = [], layer * F.stride(0), layer * G.stride(0), 0
    for p, n_in, n_out in sizes:
        out.append((F, at, G, g_at, Wt, p_at * W))
        at += p * W * n_in + n_out * W
        g_at += n_out
        p_at += p
    return out


def lowrank_views(group: tuple, p: int, n_in: int, n_out: int) -> tuple:
    """One unpack_lowrank group as views, as add_lowrank takes them: A [P*W, in], B [out/32, W, 32],
    g [(B,) 1, out] and for a batch w [B, P*W]."""
    F, a_at, G, g_at, Wt, w_at = group
    W = F.shape[1]
    flat = F.reshape(-1)
    A = flat[a_at:a_at + p * W * n_in].view(p * W, n_in)
    B = flat[a_at + p * W * n_in:a_at + p * W * n_in + n_out * W].view(n_out // LOWRANK_BLOCK, W, LOWRANK_BLOCK)
    rows = 1 if G.dim() == 3 else G.shape[1]
    g = G.reshape(-1)[g_at:].as_strided((rows, 1, n_out), (G.shape[-1], G.shape[-1], 1))
    if Wt is None:
        return A, B, g[0]
    return A, B, g, Wt.reshape(rows, -1)[:, w_at:w_at + p * W]


def add_lowrank(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, g: torch.Tensor,
                w: torch.Tensor | None = None, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """One layer's group of decode_lowrank inside a compiled decode step: x [1, 1, in], the fused
    backbone output y [1, 1, out] -> g_mix * y + the weighted low-rank paths, in float32. Written as
    products and sums, not matmuls: Inductor turns them into a few vectorised loops inside its own
    kernel (a matmul would be an external call, ~9 us each for these 1-row products, 330 per token).
    `sizes`: the output widths of the group's projections (q|k|v, gate|up; None: one projection),
    whose blocks of B follow one another.

    With `w` [B, P*width] (decode_lowrank with rows=B: a batch, each row its own mixture of the same
    factors): x [B, 1, in], y [B, 1, out], g [B, 1, out]; each row's shrink is weighed by its
    mixture before the expand."""
    Bs = B.split([n // LOWRANK_BLOCK for n in sizes]) if sizes else (B,)
    if w is None:
        h = (x.reshape(1, x.shape[-1]) * A.float()).sum(-1)  # A [P*width, in] -> h [P*width]
        # B [out/32, width, 32]: h [width] -> [out]
        delta = torch.cat([(hp[None, :, None] * Bp.float()).sum(1).reshape(-1) for hp, Bp in zip(h.chunk(len(Bs)), Bs)])
        return y * g + delta
    rows = x.shape[0]
    h = (x.reshape(rows, 1, x.shape[-1]) * A.float()).sum(-1) * w  # [B, P*width]
    delta = torch.cat([(hp[:, None, :, None] * Bp.float()).sum(2).reshape(rows, 1, -1)
                       for hp, Bp in zip(h.chunk(len(Bs), dim=-1), Bs)], dim=-1)
    return y * g + delta


def lowrank_product(module: nn.Module, x: torch.Tensor, group: tuple, sizes: tuple[int, ...]) -> torch.Tensor:
    """module(x), a backbone product inside a compiled decode step, plus one unpack_lowrank group's
    low-rank paths (add_lowrank; `sizes`: the output widths of the group's projections). One call
    of our int4 kernel with the paths fused in where `module` runs on it (int4mm.int4_mm_lowrank:
    the factors read in place, the shrink's rows and the expand's blocks split over the threads);
    else the product, then add_lowrank's loops."""
    if (isinstance(module, Int4Linear) and module.on_int4mm and module.bias is None and x.dtype == torch.float32
            and module.out_features == module.weight.shape[0] * int4mm.BLOCK):  # no padding rows
        F, a_at, G, g_at, Wt, w_at = group
        out = int4mm.int4_mm_lowrank(x.reshape(-1, x.shape[-1]), module.weight, F, a_at, G, g_at, Wt, w_at,
                                     list(sizes))
        return out.view(*x.shape[:-1], out.shape[-1])
    views = lowrank_views(group, len(sizes), x.shape[-1], sum(sizes))
    return add_lowrank(x, module(x), *views, sizes=sizes if len(sizes) > 1 else None)


def combine_group(modules, x: torch.Tensor, y: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """DoRA for projections that share their input and one fused backbone product (q|k|v, gate|up):
    `y` holds their outputs side by side. On CPU the whole group takes one mixture plan (one shrink
    for all its low-rank paths, see mixture_plan); live training, the Triton kernels and biased
    projections combine projection by projection. Runs per layer per token: keep it lean."""
    ctx = None
    for m in modules:
        if isinstance(m, DoraLinear):
            ctx = m.context
            break
    if ctx is None or (ctx.weights is None and ctx.training is None):
        return y
    if ctx.training is None and not use_triton(x):
        plan = mixture_plan(ctx, modules, x.dtype, owner)
        if plan is not None:
            return apply_mixture(plan, x, y) if plan else y
    outs = y.split([m.out_features for m in modules], dim=-1)
    return torch.cat([m.combine(x, o) if isinstance(m, DoraLinear) else o for m, o in zip(modules, outs)], dim=-1)


def _get_module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def attach_context(model: nn.Module) -> AdapterContext:
    if model.adapter_context is None:
        model.adapter_context = AdapterContext()
    return model.adapter_context


def wrap_module(model: nn.Module, path: str) -> DoraLinear:
    module = model.get_submodule(path)
    if isinstance(module, DoraLinear):
        return module
    parent_path, _, child = path.rpartition(".")
    wrapped = DoraLinear(module, attach_context(model))
    setattr(model.get_submodule(parent_path), child, wrapped)
    return wrapped


def dora_modules(model: nn.Module) -> dict[str, DoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DoraLinear)}


def linear_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Backbone linears an adapter may target, by HF module path (DoraLinear wrappers unwrapped)."""
    out = {}
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, DoraLinear):
            out[name] = module.base_layer
        elif hasattr(module, "in_features") and hasattr(module, "out_features") and ".base_layer" not in name:
            out[name] = module
    return out


def matches_target(path: str, target_modules) -> bool:
    """PEFT's rule: a string is a full regex match; a list matches by exact name or dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


# -- PEFT format ---------------------------------------------------------------------------------
def read_peft_adapter(path: str | Path) -> AdapterSpec:
    path = Path(path)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: adapter_config.json not found")
    if not weights_file.is_file():
        raise AdapterError(f"{weights_file}: adapter_model.safetensors not found")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not valid JSON ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise AdapterError(f"{cfg_file}: {key} is not supported (per-module ranks/alphas)")
    for key in ("modules_to_save", "layer_replication", "trainable_token_indices"):
        if cfg.get(key):
            raise AdapterError(f"{cfg_file}: {key} is not supported (only LoRA/DoRA weight deltas)")
    if cfg.get("lora_bias"):
        raise AdapterError(f"{cfg_file}: lora_bias adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_file}: bias={cfg['bias']!r} adapters are not supported")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{cfg_file}: missing or invalid 'r'/'lora_alpha'") from e
    spec = AdapterSpec(
        r=r,
        alpha=alpha,
        use_rslora=bool(cfg.get("use_rslora", False)),
        use_dora=bool(cfg.get("use_dora", False)),
        target_modules=cfg.get("target_modules") or [],
        base_model=cfg.get("base_model_name_or_path"),
    )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            for key in f.keys():
                match = pattern.match(key)
                if not match:
                    raise AdapterError(f"{weights_file}: unexpected tensor {key!r} (not a PEFT LoRA/DoRA key)")
                kind = match.group(2).split(".")[0]
                parts.setdefault(match.group(1), {})[kind] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterError(f"{weights_file}: cannot read safetensors ({e})") from e
    if not parts:
        raise AdapterError(f"{weights_file}: contains no adapter tensors")
    for module, t in parts.items():
        if "lora_A" not in t or "lora_B" not in t:
            raise AdapterError(f"{weights_file}: module {module!r} lacks lora_A or lora_B")
        if spec.use_dora and "lora_magnitude_vector" not in t:
            raise AdapterError(f"{weights_file}: module {module!r} lacks lora_magnitude_vector (use_dora is true)")
        spec.tensors[module] = (t["lora_A"], t["lora_B"], t.get("lora_magnitude_vector"))
    return spec


def validate_spec(model: nn.Module, spec: AdapterSpec, source: str) -> None:
    """Check every module path and shape against the backbone before anything is installed."""
    linears = linear_paths(model)
    for module, (A, B, m) in spec.tensors.items():
        if module not in linears:
            raise AdapterError(f"{source}: target module {module!r} does not exist in the backbone")
        if spec.target_modules and not matches_target(module, spec.target_modules):
            raise AdapterError(f"{source}: module {module!r} is not covered by target_modules {spec.target_modules}")
        lin = linears[module]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{source}: {module}.lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not chain")
        if A.shape[1] != lin.in_features:
            raise AdapterError(
                f"{source}: {module}.lora_A.weight has in_features {A.shape[1]}, backbone has {lin.in_features}"
            )
        if B.shape[0] != lin.out_features:
            raise AdapterError(
                f"{source}: {module}.lora_B.weight has out_features {B.shape[0]}, backbone has {lin.out_features}"
            )
        if m is not None and m.reshape(-1).shape[0] != lin.out_features:
            raise AdapterError(
                f"{source}: {module}.lora_magnitude_vector has {m.numel()} entries, backbone has {lin.out_features}"
            )
        if A.shape[0] != spec.r:
            raise AdapterError(f"{source}: {module}.lora_A rank {A.shape[0]} differs from r={spec.r} in the config")
        for t, label in ((A, "lora_A"), (B, "lora_B"), (m, "lora_magnitude_vector")):
            if t is not None and not torch.isfinite(t.float()).all():
                raise AdapterError(f"{source}: {module}.{label} contains NaN or Inf")


def install_adapter(model: nn.Module, name: str, spec: AdapterSpec) -> None:
    """Install a validated adapter and rebuild the stacks of every DoRA module."""
    ctx = attach_context(model)
    for module, (A, B, m) in spec.tensors.items():
        layer = wrap_module(model, module)
        if m is None:  # plain LoRA: W' = W0 + sBA, i.e. g = 1
            m = torch.empty(0)
        layer.add(name, A, B, m.reshape(-1), spec.scaling)
    if name not in ctx.names:
        ctx.names.append(name)
    for layer in dora_modules(model).values():
        layer.rebuild()


def remove_adapter(model: nn.Module, name: str) -> None:
    ctx = attach_context(model)
    if name not in ctx.names:
        raise UnknownAdapter(f"adapter {name!r} is not loaded (loaded: {ctx.names})")
    ctx.names.remove(name)
    for layer in dora_modules(model).values():
        layer.remove(name)
        layer.rebuild()


def new_adapter(model: nn.Module, name: str, r: int, alpha: float, target_modules=DEFAULT_TARGETS,
                use_rslora: bool = False, generator: torch.Generator | None = None) -> AdapterSpec:
    """A fresh DoRA adapter initialised as PEFT does: A kaiming-uniform, B zero, m = ||W0||_row."""
    spec = AdapterSpec(r=r, alpha=alpha, use_rslora=use_rslora, use_dora=True,
                       target_modules=list(target_modules), base_model=None)
    for path, lin in linear_paths(model).items():
        if not matches_target(path, spec.target_modules):
            continue
        A = torch.empty(r, lin.in_features)
        # kaiming_uniform_(a=sqrt(5)) is nn.Linear's default init, which PEFT uses for lora_A.
        bound = 1.0 / math.sqrt(lin.in_features)
        A.uniform_(-bound, bound, generator=generator)
        B = torch.zeros(lin.out_features, r)
        m = torch.linalg.norm(dense_weight(lin).float(), dim=1)
        spec.tensors[path] = (A, B, m)
    if not spec.tensors:
        raise AdapterError(f"target_modules {list(target_modules)} match no linear layer of the backbone")
    return spec


def save_peft_adapter(model: nn.Module, name: str, path: str | Path, base_model_name: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` exactly as PEFT lays them out."""
    layers = {p: m for p, m in dora_modules(model).items() if name in m.lora_A}
    if not layers:
        raise UnknownAdapter(f"adapter {name!r} is not loaded")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, r, scaling, use_dora = {}, None, None, True
    for p, layer in layers.items():
        A, B, m = layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name]
        tensors[f"{PEFT_PREFIX}{p}.lora_A.weight"] = A.detach().float().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{p}.lora_B.weight"] = B.detach().float().contiguous().cpu()
        if m.numel():
            tensors[f"{PEFT_PREFIX}{p}.lora_magnitude_vector"] = m.detach().float().contiguous().cpu()
        else:
            use_dora = False
        r, scaling = A.shape[0], layer.scaling[name]
    meta = getattr(model, "adapter_meta", {}).get(name, {})
    use_rslora = bool(meta.get("use_rslora", False))
    alpha = meta.get("lora_alpha", scaling * (math.sqrt(r) if use_rslora else r))
    targets = sorted({p.rsplit(".", 1)[1] for p in layers})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def mixture_vector(adapters: dict[str, float] | None, names: list[str]) -> torch.Tensor:
    """Validate a {name: weight} mixture and return it normalised over `names` ([N], sums to 1)."""
    vec = torch.zeros(len(names))
    if not adapters:
        return vec
    for name, weight in adapters.items():
        if name not in names:
            raise UnknownAdapter(f"adapter {name!r} is not loaded (loaded: {names})")
        try:
            weight = float(weight)
        except (TypeError, ValueError) as e:
            raise MixtureError(f"adapter {name!r}: weight {weight!r} is not a number") from e
        if not math.isfinite(weight) or weight < 0:
            raise MixtureError(f"adapter {name!r}: weight {weight} must be a finite non-negative number")
        vec[names.index(name)] = weight
    total = float(vec.sum())
    if total <= 0:
        raise MixtureError(f"adapter weights {adapters} must sum to a positive number")
    return vec / total
