"""Llama-family decoder (dense Llama and BitNet b1.58), configured by one dataclass.

Module names mirror Hugging Face (`model.layers.{i}.self_attn.q_proj`, ...) so state dicts and PEFT
adapter keys map 1:1. Every projection is a plain attribute holding a linear module, so a later
pass can walk the tree and swap in quantised kernels (as gpt-fast's quantize.py does).
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import BitLinear
from .dora import DoraLinear, combine_group, lowrank_product, lowrank_sizes, unpack_lowrank


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008
    head_dim: int = 0  # 0 = dim // n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    arch: str = "llama"  # "llama" | "bitnet"
    ternary: bool = False  # projections are packed BitLinear layers
    attention_bias: bool = False
    name: str = ""

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.arch not in ("llama", "bitnet"):
            raise ValueError(f"arch must be 'llama' or 'bitnet', got {self.arch!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    def to_dict(self) -> dict:
        return asdict(self)


def make_linear(cfg: ModelConfig, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    if cfg.ternary:
        return BitLinear(in_features, out_features, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the gain, as the HF reference does, so
        # bfloat16 runs round the same way.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_seq_len (HF "rotate_half" layout)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [S, hd]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, T] -> cos, sin [B, 1, T, hd] (broadcast over heads)
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


# The compiled decode step's layers without a mixture: groups q|k|v, o, gate|up, down each None.
NO_LOWRANK = (None, None, None, None)


def backbone(proj: nn.Module) -> nn.Module:
    """A projection without its DoRA wrapper: the compiled decode step takes the mixture as tensors
    and never reads the adapter context, which eager steps in other threads change."""
    return proj.base_layer if isinstance(proj, DoraLinear) else proj


class KVCache(nn.Module):
    """Per-layer key/value buffers for `max_batch` slots.

    Each sequence owns a slot and writes at its own positions, so sequences of different lengths
    decode together (continuous batching) without padding their histories to a common length.
    """

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int,
               plan: "StepPlan | None" = None):
        # slots [B], input_pos [B, T], k/v [B, Hkv, T, hd] -> cached k/v [B, Hkv, length, hd]
        if plan is not None and plan.single_slot is not None:  # one sequence, one position (compiled decode)
            kc, vc = self.k_cache[plan.single_slot], self.v_cache[plan.single_slot]  # [Hkv, S, hd]
            kc[:, plan.pos_start : plan.pos_start + 1] = k[0]
            vc[:, plan.pos_start : plan.pos_start + 1] = v[0]
            return kc[None, :, :length], vc[None, :, :length]
        if plan is not None and plan.slot_start is not None:
            # Contiguous slots: write into and attend over a view of the cache instead of gathering
            # a copy of it (narrow, not a slice: its length stays the batch's under torch.compile).
            kc, vc = self.k_cache.narrow(0, plan.slot_start, k.shape[0]), self.v_cache.narrow(0, plan.slot_start, k.shape[0])
            if plan.pos_start is not None:  # every row writes the same contiguous positions
                p0, p1 = plan.pos_start, plan.pos_start + k.shape[2]
                kc[:, :, p0:p1] = k
                vc[:, :, p0:p1] = v
            else:  # into the cache itself: under torch.compile a write through the view copies the cache
                rows = torch.arange(plan.slot_start, plan.slot_start + k.shape[0], device=k.device)[:, None]
                self.k_cache[rows, :, input_pos] = k.transpose(1, 2)
                self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
            return kc[:, :, :length], vc[:, :, :length]
        rows = slots[:, None]  # [B, 1] broadcasts against input_pos [B, T]
        self.k_cache[rows, :, input_pos] = k.transpose(1, 2)  # indexed view is [B, T, Hkv, hd]
        self.v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return self.k_cache[slots, :, :length], self.v_cache[slots, :, :length]


class StepPlan:
    """What one cached forward can decide once instead of per layer: whether the batch's KV slots
    are a contiguous range (cache views, no gathers) and whether every row writes the same
    contiguous positions (slice writes; with one row or equal positions no mask is needed)."""

    __slots__ = ("slot_start", "pos_start", "single_slot")

    @classmethod
    def single(cls, slot: int, pos: int) -> "StepPlan":
        """One sequence decoding one token at `pos` in KV slot `slot`, decided without reading a
        tensor back. The cache is indexed with `slot` (not sliced from it): under torch.compile a
        slice start becomes a guard on its value, an index only on its range."""
        plan = cls.__new__(cls)
        plan.slot_start, plan.pos_start, plan.single_slot = None, pos, slot
        return plan

    @classmethod
    def rows(cls, slot_start: int) -> "StepPlan":
        """A batch in the contiguous slots from `slot_start`, each row at its own position (the
        compiled batch step, decided without reading a tensor back)."""
        plan = cls.__new__(cls)
        plan.slot_start, plan.pos_start, plan.single_slot = slot_start, None, None
        return plan

    def __init__(self, slots: torch.Tensor, input_pos: torch.Tensor):
        self.single_slot = None
        s = slots.tolist()
        self.slot_start = s[0] if s == list(range(s[0], s[0] + len(s))) else None
        p = input_pos.tolist()
        first = p[0]
        same = all(row == first for row in p) and first == list(range(first[0], first[0] + len(first)))
        self.pos_start = first[0] if same else None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = make_linear(cfg, cfg.dim, cfg.n_heads * cfg.head_dim, cfg.attention_bias)
        self.k_proj = make_linear(cfg, cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias)
        self.v_proj = make_linear(cfg, cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias)
        self.o_proj = make_linear(cfg, cfg.n_heads * cfg.head_dim, cfg.dim, cfg.attention_bias)
        # BitNet normalises the attention output before the (ternary) output projection.
        self.attn_sub_norm = RMSNorm(cfg.n_heads * cfg.head_dim, cfg.norm_eps) if cfg.arch == "bitnet" else None
        self.kv_cache: KVCache | None = None
        self.qkv_proj: nn.Module | None = None  # set by speed.fuse_projections (rows q|k|v)
        self.mix_plan = None  # the q|k|v group's cached DoRA mixture plan (dora.mixture_plan)

    def forward(self, x, cos, sin, mask=None, slots=None, input_pos=None, kv_len=0, plan=None, lowrank=None):
        """`lowrank`: the compiled decode step's q|k|v and o groups of the mixture
        (dora.decode_lowrank; a group None: the backbone alone) instead of the adapter context's."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            # One fused backbone product for q|k|v (with or without adapters), RoPE on q and k in one go.
            # [B, T, (H + 2 Hkv) hd]; adapters add to its rows:
            if lowrank is None:
                qkv = combine_group((self.q_proj, self.k_proj, self.v_proj), x, self.qkv_proj(x), self)
            elif lowrank[0] is not None:
                qkv = lowrank_product(self.qkv_proj, x, lowrank[0], (H * hd, Hkv * hd, Hkv * hd))
            else:
                qkv = self.qkv_proj(x)
            qkv = qkv.view(B, T, H + 2 * Hkv, hd)
            qk = apply_rope(qkv[:, :, : H + Hkv].transpose(1, 2), cos, sin)  # [B, H+Hkv, T, hd]
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, :, H + Hkv :].transpose(1, 2)
        else:
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
            k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)  # [B, Hkv, T, hd]
            v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(slots, input_pos, k, v, kv_len, plan)  # [B, Hkv, L, hd]
            if mask is None and T > 1:  # one prompt from position 0: plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # [B, T, H*hd]
        if self.attn_sub_norm is not None:
            y = self.attn_sub_norm(y)
        if lowrank is not None:
            o_proj = backbone(self.o_proj)
            return o_proj(y) if lowrank[1] is None else lowrank_product(o_proj, y, lowrank[1], (o_proj.out_features,))
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = make_linear(cfg, cfg.dim, cfg.hidden_dim)
        self.up_proj = make_linear(cfg, cfg.dim, cfg.hidden_dim)
        self.down_proj = make_linear(cfg, cfg.hidden_dim, cfg.dim)
        self.bitnet = cfg.arch == "bitnet"
        self.ffn_sub_norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps) if self.bitnet else None
        self.gate_up_proj: nn.Module | None = None  # set by speed.fuse_projections (rows gate|up)
        self.mix_plan = None  # the gate|up group's cached DoRA mixture plan (dora.mixture_plan)

    def forward(self, x: torch.Tensor, lowrank=None) -> torch.Tensor:
        """`lowrank`: the gate|up and down groups from the compiled decode step, as in Attention."""
        if self.gate_up_proj is not None:
            if lowrank is None:
                gate_up = combine_group((self.gate_proj, self.up_proj), x, self.gate_up_proj(x), self)
            elif lowrank[0] is not None:
                gate_up = lowrank_product(self.gate_up_proj, x, lowrank[0],
                                          (self.gate_proj.out_features, self.up_proj.out_features))
            else:
                gate_up = self.gate_up_proj(x)
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.ffn_sub_norm(F.relu(gate).square() * up) if self.bitnet else F.silu(gate) * up
            if lowrank is not None:
                down_proj = backbone(self.down_proj)
                if lowrank[1] is None:
                    return down_proj(h)
                return lowrank_product(down_proj, h, lowrank[1], (down_proj.out_features,))
            return self.down_proj(h)
        if self.bitnet:
            h = F.relu(self.gate_proj(x)).square() * self.up_proj(x)  # [B, T, hidden]
            return self.down_proj(self.ffn_sub_norm(h))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask=None, slots=None, input_pos=None, kv_len=0, plan=None, lowrank=None):
        attn_lowrank, mlp_lowrank = (None, None) if lowrank is None else (lowrank[:2], lowrank[2:])
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, slots, input_pos, kv_len, plan,
                               attn_lowrank)
        return h + self.mlp(self.post_attention_layernorm(h), mlp_lowrank)


class DecoderModel(nn.Module):
    """The `model.` prefix of HF Llama checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        # lm_head stays dense even on BitNet: the 2B-4T checkpoint keeps it (tied) in bf16.
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Set by dora.attach_context(); holds the batch's adapter mixture matrix while a forward runs.
        self.adapter_context = None
        self.max_batch = 0
        self.cache_len = 0
        self.compiled_decode = None  # torch.compile'd decode_one, set by Engine.compile_decode()
        self.compiling = False  # while Engine.compile_decode runs
        self.compiled_mixture_rank = 0  # the rank sum its mixture graphs take (0: none)
        self.compiled_mixture_dtype = torch.float32  # their low-rank factors' dtype
        # (mixture, adapter context version, its decode_lowrank tensors, eager?) of the last lone
        # sequence's mixture step (generate._lone_lowrank)
        self.compiled_lowrank = None
        self.compiled_rows = None  # torch.compile'd decode_rows (batches in contiguous slots)
        self.compiled_rows_rank = 0  # the rank sum over a batch's adapters its mixture graphs take

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        """Allocate KV buffers for `max_batch` slots of `max_seq_len` tokens (gpt-fast style)."""
        max_seq_len = min(max_seq_len, self.config.max_seq_len)
        if self.max_batch >= max_batch and self.cache_len >= max_seq_len:
            return
        cfg = self.config
        dtype, device = self.model.embed_tokens.weight.dtype, self.model.embed_tokens.weight.device
        self.compiled_decode = self.compiled_rows = None  # built for the old buffers: eager until compiled again
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim, dtype, device)
        self.max_batch, self.cache_len = max_batch, max_seq_len

    def kv_entries(self, slots: list[int], pos: int) -> list[torch.Tensor]:
        """Copies of every layer's cached keys and values at position `pos` of `slots`."""
        out = []
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            out += [cache.k_cache[slots, :, pos].clone(), cache.v_cache[slots, :, pos].clone()]
        return out

    def restore_kv_entries(self, slots: list[int], pos: int, entries: list[torch.Tensor]) -> None:
        """Put back what kv_entries copied."""
        for layer, k, v in zip(self.model.layers, entries[0::2], entries[1::2]):
            cache = layer.self_attn.kv_cache
            cache.k_cache[slots, :, pos] = k
            cache.v_cache[slots, :, pos] = v

    def decode_one(self, tokens: torch.Tensor, slot_plus_2: int, length_plus_2: int, lowrank=None) -> torch.Tensor:
        """One decode step of ONE sequence: tokens [1, 1] at position `length - 1` of KV slot
        `slot` -> logits [1, 1, V], with the adapter mixture given as `lowrank` (tensors whose
        width, the mixture's ranks summed, is a symbol of the graph: dora.decode_lowrank) or none.
        What `forward` computes for that case, written for torch.compile (Engine.compile_decode): no tensor is read back
        into Python, the slot and length are plain ints that become symbols of one dynamic graph.
        The ints arrive plus 2 because the compiler specialises the values 0 and 1 (a recompile
        each) and a step can have slot 0 or 1.
        """
        slot, length = slot_plus_2 - 2, length_plus_2 - 2
        x = self.model.embed_tokens(tokens)  # [1, 1, D]
        input_pos = torch.full((1, 1), length - 1, dtype=torch.long, device=tokens.device)
        cos, sin = self.rope(input_pos, x.dtype)
        plan = StepPlan.single(slot, length - 1)
        sizes = lowrank_sizes(self) if lowrank is not None else None
        for i, layer in enumerate(self.model.layers):
            layer_lowrank = NO_LOWRANK if lowrank is None else unpack_lowrank(lowrank, i, sizes)
            x = layer(x, cos, sin, None, None, input_pos, length, plan, layer_lowrank)
        return self.lm_head(self.model.norm(x)).float()

    def decode_rows(self, tokens: torch.Tensor, input_pos: torch.Tensor, slot_start_plus_2: int, length_plus_2: int,
                    lowrank=None) -> torch.Tensor:
        """One decode step of a batch of B sequences in the contiguous KV slots from `slot_start`:
        tokens [B, 1] at positions input_pos [B, 1], `length` = the largest position + 1 -> logits
        [B, 1, V]; each row's adapter mixture given as `lowrank` (dora.decode_lowrank, rows=B: the
        batch's adapters' factors once, per-row weights and g) or none. `forward` for that case,
        written for torch.compile as decode_one is (Engine.compile_decode)."""
        slot_start, length = slot_start_plus_2 - 2, length_plus_2 - 2
        x = self.model.embed_tokens(tokens)  # [B, 1, D]
        cos, sin = self.rope(input_pos, x.dtype)
        plan = StepPlan.rows(slot_start)
        key_pos = torch.arange(length, device=tokens.device)
        mask = (key_pos[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, 1, length]
        sizes = lowrank_sizes(self) if lowrank is not None else None
        for i, layer in enumerate(self.model.layers):
            layer_lowrank = NO_LOWRANK if lowrank is None else unpack_lowrank(lowrank, i, sizes)
            x = layer(x, cos, sin, mask, None, input_pos, length, plan, layer_lowrank)
        return self.lm_head(self.model.norm(x)).float()

    def forward(self, tokens, input_pos=None, slots=None, mixture=None, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (float32); [B, 1, V] with `last_only` (prefill needs
        only the last position, and the vocabulary product is the largest one in the model).

        Without `input_pos` this is a full causal forward with no cache (scoring, training).
        With `input_pos` [B, T] and `slots` [B], keys/values go to (and come from) the KV cache.
        `mixture` [B, N] holds each sequence's weights over the resident adapters.
        """
        B, T = tokens.shape
        x = self.model.embed_tokens(tokens)  # [B, T, D]
        mask, kv_len, plan = None, 0, None
        if input_pos is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        else:
            positions = input_pos
            plan = StepPlan(slots, input_pos)
            kv_len = int(input_pos.max()) + 1
            # Rows that all write the same positions starting right after their history (one
            # sequence, or a batch in lockstep) need no mask: decode sees every cached key, a
            # prompt from position 0 is plain causal. Anything else gets the explicit mask.
            lockstep = plan.pos_start is not None and (T == 1 or plan.pos_start == 0)
            if not lockstep:
                key_pos = torch.arange(kv_len, device=tokens.device)
                mask = (key_pos[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # [B, 1, T, L]
        cos, sin = self.rope(positions, x.dtype)
        ctx = self.adapter_context
        if ctx is not None:
            ctx.set_mixture(mixture)
        try:
            for layer in self.model.layers:
                x = layer(x, cos, sin, mask, slots, input_pos, kv_len, plan)
            if last_only:
                x = x[:, -1:]
            x = self.model.norm(x)
            return self.lm_head(x).float()
        finally:
            if ctx is not None:
                ctx.set_mixture(None)


def ternarize_model(model: Transformer) -> Transformer:
    """Swap every decoder projection for a packed BitLinear (absmean), in place. Lossy on a dense
    model; the config is marked `ternary=True` so capabilities() reports it."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, BitLinear.from_dense(child))
    model.config.ternary = True
    return model
