"""The engine's public face: load a model, tokenize, score, generate, manage DoRA adapters."""

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx

from . import dora, triton_kernels
from .errors import AdapterError, ContextLengthExceeded, EngineError, QuantModeError
from .generate import Batch, SamplingParams, Sequence, generate, quick_gil_while_compiling
from .loaders import load_model, prepare_default_model
from .model import Transformer
from .prefetch import factor_prefetch
from .bitlinear import BitLinear
from .speed import QUANT_MODES, TERNARY_HEAD_QUANT, Int4Linear, optimize_model, quantised
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Inductor options of the compiled decode step (Engine.compile_decode): a C++ wrapper calls the
# kernels instead of Python, and no size/stride asserts around every external kernel (each a
# Python call per layer per token); benchmarks/RESULTS.md, fifth session.
COMPILE_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False, "scalar_asserts": False}
# Loops of fewer elements per thread than this run serially in the mixture graphs.
SERIAL_LOOP_ELEMENTS = 1 << 22
# The KV position the compile warm-up steps write (and restore) in slots 0 to 2.
WARM_POSITION = 1
# The mixture width (ranks per projection) of the warm-up steps: the graphs take every width as a
# symbol (dora.decode_lowrank), so any value will do that no other size of the step shares (dynamo
# would make the two one symbol).
WARM_WIDTH = 24


def guards_off_the_model(entries) -> list[bool]:
    """Dynamo guard filter of the compiled decode step (Engine.compile_decode): no guards on what
    the model holds (its modules, parameters and buffers: ~1 ms of checks on every token); those
    on the step's arguments and on the global state stay."""
    return [not entry.orig_guard.source.is_unspecialized_nn_module() for entry in entries]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise EngineError(f"dtype {dtype!r} is not supported (float32, bfloat16, float16)") from None


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' requested but CUDA is not available")
    return device


def resolve_quant(quant: str | None, is_ternary: bool, device: torch.device, source: str) -> str | None:
    """The quantisation a checkpoint runs with; "auto" picks the served one (ternary checkpoints:
    the packed ternary kernel; dense ones: int4 on CPU). A mode that cannot run this checkpoint
    is a QuantModeError naming it."""
    on_cpu = device.type == "cpu"
    if quant == "auto":
        if is_ternary:
            return "ternary" if on_cpu else ("int8" if triton_kernels.available() else None)
        return "int4" if on_cpu else None
    if is_ternary and quant == "int4":
        raise QuantModeError(f"quant='int4' applies to dense checkpoints; {source} is ternary (BitNet b1.58, "
                             "2-bit packed): use 'auto' or 'ternary' (the packed ternary kernel), or none")
    if not is_ternary and quant == "ternary":
        raise QuantModeError(f"quant='ternary' runs ternary (BitNet b1.58) checkpoints; {source} is dense: use 'auto', "
                             "'int4', 'int8' or none")
    if quant is not None and not on_cpu and not (quant == "int8" and is_ternary and triton_kernels.available()):
        raise QuantModeError(f"quant={quant!r} uses CPU kernels; on {device} only packed ternary checkpoints run "
                             "quantised (quant='int8', the Triton W2A8 kernel)")
    return quant


@contextlib.contextmanager
def compiling(model):
    """Transformer.compiling while compile_decode runs (Batch.step decodes on one thread meanwhile)."""
    model.compiling = True
    try:
        yield
    finally:
        model.compiling = False


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, source: str, dtype: torch.dtype,
                 device: torch.device, load_seconds: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.source, self.dtype, self.device = source, dtype, device
        self.load_seconds = load_seconds
        self.adapter_paths: dict[str, str] = {}
        self.model.adapter_meta = {}
        # The backbone is frozen; only DoRA parameters may ever be trained (train.py checks).
        self.model.requires_grad_(False)
        dora.attach_context(model)
        # Adapter (un)loading rewrites the DoRA stacks that a running forward reads.
        self.lock = threading.RLock()
        self._mixture_matrix = None  # (key, tensor) of the last mixture_matrix call

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike | None = None, dtype="float32", device="cpu", ternary: bool = False,
             cache_dir: str | os.PathLike | None = None, quant: str | None = None, fuse: bool = True) -> "Engine":
        """Load a .gguf file or HF dir; with no path, the default model (converted once, cached).

        `quant`: None (exact, in `dtype`); "int8" or "int4" weight-only (dense checkpoints, CPU
        kernels, lm_head included); "ternary" (ternary checkpoints: the packed 2-bit kernel,
        ternary.py, and an int4 head); "auto": what serves each best (resolve_quant).
        `fuse`: one q|k|v and one gate|up product per layer (same logits; adapters still apply).
        """
        start = time.perf_counter()
        torch_dtype, torch_device = _resolve_dtype(dtype), _resolve_device(device)
        if quant in ("", "none", "None", "float32", "fp32", "bfloat16", "bf16"):
            quant = None  # a settings string naming a float precision means "no weight quantisation"
        if quant not in QUANT_MODES + ("auto",):
            raise QuantModeError(f"quant {quant!r} is not supported (None, 'auto', 'int8', 'int4', 'ternary')")
        if path is None:
            path = prepare_default_model(cache_dir)
        model, tokenizer = load_model(path, torch_dtype, torch_device, ternary=ternary)
        quant = resolve_quant(quant, model.config.ternary, torch_device, str(path))
        if quant == "int8" and model.config.ternary:
            # W2A8 with the weights unpacked per call (PyTorch's _int_mm; on CUDA the Triton kernel)
            for module in model.modules():
                if isinstance(module, BitLinear):
                    module.int8_kernel = True
            model.quant = "ternary-int8"
        else:
            optimize_model(model, quant=quant, fuse=fuse)
        return cls(model, tokenizer, str(path), torch_dtype, torch_device, time.perf_counter() - start)

    # -- text ----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def render(self, messages_or_prompt) -> str:
        """A chat (list of {role, content}) through the model's template; a str is used as is."""
        if isinstance(messages_or_prompt, str):
            return messages_or_prompt
        return self.tokenizer.apply_chat_template(list(messages_or_prompt), add_generation_prompt=True)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self.model.adapter_context.names)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a PEFT-format (DoRA or LoRA) adapter. Validated in full before anything changes."""
        if not name or not isinstance(name, str):
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        with quick_gil_while_compiling(self.model):
            spec = dora.read_peft_adapter(path)
            dora.validate_spec(self.model, spec, str(path))
            with self.lock:
                if name in self.adapters:
                    dora.remove_adapter(self.model, name)
                self._install(name, spec)
                self.adapter_paths[name] = str(path)

    def _install(self, name: str, spec: dora.AdapterSpec) -> None:
        spec.tensors = {k: tuple(None if t is None else t.to(self.device) for t in v) for k, v in spec.tensors.items()}
        dora.install_adapter(self.model, name, spec)
        self.model.adapter_meta[name] = {"lora_alpha": spec.alpha, "use_rslora": spec.use_rslora, "r": spec.r}

    def new_adapter(self, name: str, r: int = 8, alpha: float = 16.0, target_modules=dora.DEFAULT_TARGETS,
                    use_rslora: bool = False, seed: int = 0) -> None:
        """Create a fresh DoRA adapter (B = 0, so it starts as the identity), e.g. for training."""
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded")
        gen = torch.Generator().manual_seed(seed)
        spec = dora.new_adapter(self.model, name, r, alpha, target_modules, use_rslora, gen)
        with self.lock:
            self._install(name, spec)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            dora.remove_adapter(self.model, name)
            self.adapter_paths.pop(name, None)
            self.model.adapter_meta.pop(name, None)

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        return dora.save_peft_adapter(self.model, name, path, base_model_name=self.config.name or self.source)

    def mixture_matrix(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Stack the sequences' {name: weight} mixtures into [B, N] over the resident adapters.

        Called before every step: the same sequences with the same resident adapters get the same
        tensor object back (never modified in place), so what the decode step derives from it is
        derived once per mixture, not once per token (generate._lone_lowrank)."""
        names = self.model.adapter_context.names
        if not names or not any(s.mixture for s in seqs):
            return None
        key = (tuple(names), tuple((s.id, tuple(s.mixture.items()) if s.mixture else None) for s in seqs))
        cached = self._mixture_matrix
        if cached is not None and cached[0] == key:
            return cached[1]
        rows = [dora.mixture_vector(s.mixture, names) for s in seqs]
        matrix = torch.stack(rows).to(device=self.device, dtype=torch.float32)
        self._mixture_matrix = (key, matrix)
        return matrix

    # -- compute -------------------------------------------------------------------------------
    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise EngineError("token list is empty")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        if len(ids) > self.config.max_seq_len:
            raise ContextLengthExceeded(
                f"{len(ids)} tokens exceed the context length of {self.config.max_seq_len} (max_seq_len)")
        return ids

    @torch.inference_mode()
    def logits(self, ids, adapters: dict[str, float] | None = None) -> torch.Tensor:
        """Full causal forward without cache: Tensor[len(ids), vocab], float32."""
        ids = self._check_ids(ids)
        with self.lock:
            mix = self.mixture_matrix([Sequence(ids, mixture=adapters)])
            tokens = torch.tensor([ids], device=self.device)
            return self.model(tokens, mixture=mix)[0].float()

    def sequence(self, messages_or_prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=(), adapters: dict[str, float] | None = None,
                 cancel=None, ignore_eos: bool = False, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, repetition_penalty: float = 1.0) -> Sequence:
        """Build a validated Sequence (for `generate` or for a worker's `Batch`)."""
        ids = self._check_ids(self.tokenize(self.render(messages_or_prompt)))
        if adapters:
            dora.mixture_vector(adapters, self.adapters)  # raise now, not mid-batch
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=tuple([stop] if isinstance(stop, str) else stop or ()),
                                ignore_eos=ignore_eos, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, repetition_penalty=repetition_penalty)
        return Sequence(ids, params, dict(adapters) if adapters else None, cancel)

    def new_batch(self, max_batch: int = 8, max_seq_len: int = 2048) -> Batch:
        """A continuous-batching scheduler on this engine's model (one active batch per engine)."""
        return Batch(self.model, self.tokenizer, max_batch, max_seq_len, self.mixture_matrix, self.lock)

    def compile_decode(self, mixture_rank: int = 64) -> bool:
        """Compile the decode step (torch.compile, Inductor: the ~35 small ops per layer, and an
        adapter mixture's, fuse into a few C++ kernels; about 1.6x eager int4 decode for a lone
        sequence here, benchmarks/RESULTS.md). Call it after the batch that will serve exists
        (`new_batch`): the graphs are built for that KV cache, and a larger cache later drops them
        (eager again). Sequences may run meanwhile: they decode eagerly, on one intra-op thread,
        while dynamo and AOT autograd trace and Inductor compiles (the engine lock is held only
        while a warm-up step runs), and the KV entries that the warm-up steps write are put back.

        Graphs for a lone sequence (Transformer.decode_one; slot 0, other slots) serve every slot
        and length; graphs for a batch in one ascending run of slots (decode_rows; from slot 0, from
        later slots) serve every batch size and length. With `mixture_rank` > 0 as many again take
        adapter mixtures: a lone sequence's whose ranks sum to at most `mixture_rank` per projection,
        a batch's whose adapters' ranks together sum to at most twice that, passed in as tensors
        whose width (the ranks summed, dora.decode_lowrank) is a symbol of the graph: a lone r=8
        expert reads a third of the factor bytes of three; wider mixtures, batches in scattered
        slots and live training run the eager forward. In the quantised modes the mixtures'
        factors are bfloat16 (accumulated in float32, g in float32).
        Should a call still need a recompile, it runs eagerly instead of stalling a request
        (generate.decode_one_token). The seven projections of every layer are wrapped for DoRA now,
        so loading adapters later does not change what the graphs were built on. The first compile
        takes minutes on two cores; Inductor caches it on disk (TORCHINDUCTOR_CACHE_DIR), so later
        starts take seconds. Returns False, and leaves the engine eager, when compiling fails (no
        C++ compiler, ...).
        """
        model = self.model
        if model.max_batch == 0:
            raise EngineError("compile_decode needs the KV cache: create the serving batch first (new_batch)")
        # Ternary models stay eager: their graphs (the ternary op inside Inductor's C++ wrapper) have
        # no test yet of giving the eager tokens.
        if model.config.ternary or any(layer.self_attn.qkv_proj is None or layer.mlp.gate_up_proj is None
                                       for layer in model.model.layers):
            log.info("compile_decode: only fused dense models compile; staying eager")
            return False
        started = time.monotonic()
        # Pin this thread's intra-op thread count (the graphs are built for it and guard on it):
        # ATen takes a new thread's from the last set_num_threads, which Batch.step changes while
        # the model is compiling.
        torch.get_num_threads()
        # The quantised modes take their activations in bfloat16 already (the int4/int8 kernels):
        # their low-rank factors too, which halves the bytes the mixture reads per token.
        factor_dtype = torch.bfloat16 if quantised(model) else model.model.embed_tokens.weight.dtype
        warm_slots = list(range(min(3, model.max_batch)))  # the KV slots the warm-up steps write

        def backend(gm, example_inputs):
            # Dynamo's trace, AOT autograd's trace and Inductor's lowering and C++ build (minutes on
            # a cold cache) all run without the engine lock: sequences decode eagerly meanwhile
            # (Batch.step takes the lock per step). The graphs read no Python state that eager
            # steps change (Transformer.decode_one). While AOT autograd traces, torch.fx patches
            # nn.Module.__call__ and __getattr__ for every thread, but make_fx's tracer passes an
            # eager step's calls straight through (PythonKeyTracer.call_module, .getattr; its fake
            # and proxy modes are the tracing thread's own). The graph's first run, the warm-up
            # step, writes one KV position of slots running sequences may own: it runs under the
            # lock, and what it overwrites is put back.
            compiled_graph = compile_fx(gm, example_inputs, config_patches=COMPILE_OPTIONS)
            warm = []

            def run(*args):
                if warm:
                    return compiled_graph(*args)
                warm.append(True)
                with self.lock:
                    entries = model.kv_entries(warm_slots, WARM_POSITION)
                    try:
                        return compiled_graph(*args)
                    finally:
                        model.restore_kv_entries(warm_slots, WARM_POSITION, entries)

            return run

        def warm_up(fn, args, lowrank):
            # A call that a graph built already takes runs that graph under the lock (the stance
            # raises, before any step, when it would compile); one that needs a new graph is traced
            # and compiled without the lock, and the new graph's first run takes it (backend).
            with self.lock:
                entries = model.kv_entries(warm_slots, WARM_POSITION)
                try:
                    with torch.compiler.set_stance("fail_on_recompile"):
                        fn(*args, lowrank)
                    return
                except RuntimeError as exc:
                    if "fail_on_recompile" not in str(exc):
                        raise
                finally:
                    model.restore_kv_entries(warm_slots, WARM_POSITION, entries)
            fn(*args, lowrank)

        # Dynamo's per-token work, measured at ~1.4 ms of a ~8 ms step (benchmarks/RESULTS.md,
        # tenth session), is cut three ways. The model's tensors are installed in the graphs
        # (install_free_tensors) instead of being fetched from the module tree as ~370 inputs on
        # every call; the guards on the model's modules, parameters and buffers are dropped
        # (guards_off_the_model): what the graphs read of the model is fixed while they live
        # (every projection was wrapped above, adapters change only what the graphs never read,
        # Transformer.decode_one, and a new KV cache drops them, setup_caches); and each compile
        # keeps its own graphs (isolate_recompiles), so another engine's model in the same process
        # (tests, benchmarks) never runs this one's graphs. The guards on the step's own arguments
        # (slot 0 or not, mixture or not, the widths) and on the global state (grad mode, threads)
        # stay.
        compiled = torch.compile(model.decode_one, backend=backend, dynamic=True, fullgraph=True,
                                 isolate_recompiles=True, options={"guard_filter_fn": guards_off_the_model})
        rows_compiled = torch.compile(model.decode_rows, backend=backend, dynamic=True, fullgraph=True,
                                      isolate_recompiles=True, options={"guard_filter_fn": guards_off_the_model})
        rows_rank = 2 * mixture_rank  # a batch's adapters together: more of them than one sequence's
        # inference_mode as Batch.step runs it (the graph guards on that). specialize_float: else
        # the first graph of each step kind fails AOT autograd's pass that turns a float scalar into
        # a tensor, and dynamo traces it again (10-20 s lost per graph, benchmarks/RESULTS.md).
        with torch.inference_mode(), torch._dynamo.config.patch(specialize_float=True, install_free_tensors=True), \
                compiling(model):
            with self.lock:
                cache = model.model.layers[0].self_attn.kv_cache
                for path in dora.linear_paths(model):
                    if path.rsplit(".", 1)[-1] in dora.DEFAULT_TARGETS:
                        dora.wrap_module(model, path)
            # Inductor specialises slot 0 (its cache view starts at offset 0) against the other
            # slots (a guard seen with TORCH_LOGS=recompiles): build both now, not mid-request.
            # (A context filled to its very last position would need one more graph: that one step
            # runs eagerly, see generate.decode_one_token.) Batches: any size from 2, any run of
            # slots (their sizes are symbols).
            token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            calls = [(compiled, (token, slot + 2, WARM_POSITION + 1 + 2)) for slot in warm_slots[:2]]
            if model.max_batch > 1:
                tokens = torch.zeros((2, 1), dtype=torch.long, device=self.device)
                positions = torch.full((2, 1), WARM_POSITION, dtype=torch.long, device=self.device)
                calls += [(rows_compiled, (tokens, positions, start + 2, WARM_POSITION + 1 + 2))
                          for start in sorted({0, min(1, model.max_batch - 2)})]
            warmups = [(fn, args, None) for fn, args in calls]
            if mixture_rank > 0:
                with self.lock:
                    zeros = dora.decode_lowrank(model, WARM_WIDTH, factor_dtype, zeros=True)
                    zeros_rows = dora.decode_lowrank(model, WARM_WIDTH, factor_dtype, zeros=True, rows=2)
                if zeros is None:  # e.g. biased projections (Qwen-style): their mixtures combine per projection
                    log.info("compile_decode: this model's mixtures cannot enter the graph; they decode eagerly")
                    mixture_rank = rows_rank = 0
                else:
                    # The mixture's width is a symbol of the graph (mark_dynamic: compiling fails
                    # rather than specialise it); a batch's size (dim 1 of its g and w) is left to
                    # dynamo (a symbol, but a KV cache of two slots fixes it at 2); every other
                    # size is fixed.
                    def mark(t, width_dim=None, batch_dim=None):
                        for dim in range(t.dim()):
                            if dim == width_dim:
                                torch._dynamo.mark_dynamic(t, dim)
                            elif dim != batch_dim:
                                torch._dynamo.mark_static(t, dim)

                    F, G = zeros  # a lone sequence's factors and g, packed (dora.pack_lowrank)
                    mark(F, width_dim=1)
                    mark(G)
                    F, G, Wt = zeros_rows  # a batch's: and its rows' weights
                    mark(F, width_dim=1)
                    mark(G, batch_dim=1)
                    mark(Wt, width_dim=2, batch_dim=0)
                    warmups += [(fn, args, zeros if fn is compiled else zeros_rows) for fn, args in calls]
            try:
                for fn, args, lowrank in warmups:
                    # The mixture's loops are small (a few hundred KB of factors each, read from
                    # DRAM): run serially, as the rest of the step's own loops are, they skip an
                    # OpenMP fork and barriers each (benchmarks/RESULTS.md, fifth session); and
                    # they prefetch the factors ahead of their loads (prefetch.py).
                    if lowrank is None:
                        warm_up(fn, args, lowrank)
                        continue
                    with inductor_config.patch({"cpp.min_chunk_size": SERIAL_LOOP_ELEMENTS}), factor_prefetch():
                        warm_up(fn, args, lowrank)
            except Exception as exc:  # Inductor needs a working C++ toolchain; eager still serves
                log.warning("compile_decode failed, decoding eagerly: %s: %s", type(exc).__name__, exc)
                return False
            with self.lock:
                model.compiling = False  # with the graphs, in one go: they need the step's full thread count
                if model.model.layers[0].self_attn.kv_cache is not cache:
                    # A larger batch replaced the KV cache while compiling (setup_caches).
                    log.warning("compile_decode: the KV cache changed while compiling; decoding eagerly")
                    return False
                model.compiled_decode, model.compiled_lowrank = compiled, None
                model.compiled_mixture_rank = mixture_rank
                model.compiled_mixture_dtype = factor_dtype
                model.compiled_rows = rows_compiled if model.max_batch > 1 else None
                model.compiled_rows_rank = rows_rank
        log.info("decode graph compiled in %.1f s", time.monotonic() - started)
        return True

    def generate(self, messages_or_prompt, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=(), adapters: dict[str, float] | None = None,
                 cancel=None, callback: Callable[[str], None] | None = None,
                 max_seq_len: int = 2048, ignore_eos: bool = False, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, repetition_penalty: float = 1.0) -> Iterator[str]:
        """Stream text pieces (valid UTF-8, stop strings excluded) for one prompt or chat."""
        seq = self.sequence(messages_or_prompt, max_tokens, temperature, top_p, top_k, seed, stop, adapters, cancel,
                            ignore_eos, frequency_penalty, presence_penalty, repetition_penalty)
        if len(seq.prompt_ids) >= min(max_seq_len, self.config.max_seq_len):
            raise ContextLengthExceeded(
                f"prompt has {len(seq.prompt_ids)} tokens; the context holds {min(max_seq_len, self.config.max_seq_len)}")
        self.last_sequence = seq
        # The lock is taken per step (not across yields), so a slow consumer never blocks adapter loads.
        yield from generate(self.model, self.tokenizer, seq, max_seq_len, self.mixture_matrix, callback, self.lock)

    # -- reporting -----------------------------------------------------------------------------
    def ternary_isa(self) -> str | None:
        """The instruction set this model's ternary layers chose when they were built (None: PyTorch)."""
        layer = self.model.model.layers[0].self_attn.qkv_proj or self.model.model.layers[0].self_attn.q_proj
        return getattr(layer, "isa", None)

    def serving_summary(self) -> str:
        """One line saying what runs: the weights, their kernel, the head."""
        cfg, quant = self.config, getattr(self.model, "quant", None)
        if cfg.ternary:
            weights = "BitNet b1.58, ternary" if cfg.arch == "bitnet" else "ternarised from dense (lossy)"
            if quant == "ternary":
                isa = self.ternary_isa()
                kernel = f"{isa.upper()} kernel" if isa else "PyTorch kernel (unpacked per call)"
                return f"{weights}, 2-bit packed, {kernel}, {TERNARY_HEAD_QUANT} head"
            if quant == "ternary-int8":
                return f"{weights}, 2-bit packed, int8 activations (unpacked per call)"
            return f"{weights}, 2-bit packed, {str(self.dtype).removeprefix('torch.')} reference path"
        if quant == "int4":
            head = self.model.lm_head
            kernel = "AVX512-BF16 kernel" if isinstance(head, Int4Linear) and head.on_int4mm else "PyTorch kernel"
            return f"dense, int4 weight-only, {kernel}"
        if quant == "int8":
            return "dense, int8 weight-only"
        return f"dense, {str(self.dtype).removeprefix('torch.')}"

    def capabilities(self) -> dict:
        cfg = self.config
        fused = ("qkv_proj.", "gate_up_proj.")  # row views of these are counted as q/k/v, gate/up
        n_params = sum(p.numel() for n, p in self.model.named_parameters()
                       if ".lora_" not in n and not any(f in n for f in fused))
        for n, m in self.model.named_modules():  # packed/quantised linears hold weights in buffers
            if hasattr(m, "dense_weight") and not any(n.endswith(f[:-1]) for f in fused):
                if not (n == "lm_head" and cfg.tie_embeddings):
                    n_params += m.in_features * m.out_features
        # Tied weights and the row views of fused projections share storage: count each storage once.
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.model.state_dict().values()}
        weight_bytes = sum(storages.values())
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            memory = {"device_total_bytes": total, "device_free_bytes": free}
        else:
            pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
            memory = {"ram_total_bytes": pages * page, "ram_available_bytes": os.sysconf("SC_AVPHYS_PAGES") * page}
        memory["weights_bytes"] = weight_bytes
        return {
            "model": cfg.name,
            "source": self.source,
            "arch": cfg.arch,
            "ternary": cfg.ternary,
            "weights": "ternary (BitNet b1.58, 2-bit packed)" if cfg.ternary else "dense",
            # what runs, in words, for the pages and the API ("BitNet b1.58, ternary, ...")
            "serving": self.serving_summary(),
            "ternarized_from_dense": cfg.ternary and cfg.arch == "llama",
            "n_params": n_params,
            "context_length": cfg.max_seq_len,
            "vocab_size": cfg.vocab_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "precision": getattr(self.model, "quant", None) or str(self.dtype).removeprefix("torch."),
            "quant": getattr(self.model, "quant", None),
            "backend": "pytorch-cuda" if self.device.type == "cuda" else "pytorch-cpu",
            # the Triton kernels (W2A8 ternary matmul, fused DoRA mixtures) run: CUDA + the optional extra
            "triton_kernels": self.device.type == "cuda" and triton_kernels.available(),
            # which kernel runs the int4 products: ours (int4mm.cpp, AVX512-BF16) or PyTorch's
            "int4_kernel": (None if not isinstance(self.model.lm_head, Int4Linear) else  # int4: every product
                            "avx512-bf16" if self.model.lm_head.on_int4mm else "pytorch"),
            # which kernel runs the packed ternary products (ternary.cpp: avx512-vnni or avx2), or
            # "pytorch" (unpacked per call); None: no packed ternary products
            "ternary_kernel": (None if getattr(self.model, "quant", None) != "ternary" else
                               self.ternary_isa() or "pytorch"),
            "threads": torch.get_num_threads(),
            # a lone sequence decodes through the torch.compile'd graphs, with a mixture whose
            # ranks sum to at most compiled_mixture_rank too
            "compiled_decode": self.model.compiled_decode is not None,
            "compiled_mixture_rank": self.model.compiled_mixture_rank if self.model.compiled_decode is not None else 0,
            "memory": memory,
            "adapters": self.adapters,
            "load_seconds": round(self.load_seconds, 3),
        }
