"""Generation: prefill + decode with a KV cache, sampling, streaming text, continuous batching.

Shape follows gpt-fast: `prefill`, `decode_one_token`, `sample`, and a `generate` loop with a
token callback. `Batch` is what the inference worker drives: sequences join with `add()`, each
`step()` decodes one token for every running sequence in ONE forward (each with its own sampling
parameters and adapter mixture), and finished sequences leave and free their KV slot.
"""

import contextlib
import itertools
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .dora import decode_lowrank
from .errors import ContextLengthExceeded, EngineError
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always produce max_tokens
    # OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), count = times
    # the token was generated so far in this answer.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # llama.cpp's / Hugging Face's: a token among the last REPEAT_WINDOW of the sequence (prompt
    # tail and answer) has its logit divided by this (multiplied when negative); 1 = off.
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise EngineError(f"{name} must be between -2 and 2, got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2:
            raise EngineError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)


REPEAT_WINDOW = 64  # tokens the repetition penalty looks back over (llama.cpp's repeat_last_n)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids, output_ids) -> torch.Tensor:
    """logits [V] -> a penalised copy (the same tensor when no penalty is set)."""
    rp = params.repetition_penalty
    if rp != 1.0:
        tail = list(output_ids[-REPEAT_WINDOW:])
        need = REPEAT_WINDOW - len(tail)
        recent = (list(prompt_ids[-need:]) if need > 0 else []) + tail
        ids = torch.tensor(sorted(set(recent)), dtype=torch.long)
        logits = logits.clone()
        vals = logits[ids]
        logits[ids] = torch.where(vals > 0, vals / rp, vals * rp)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        ids, counts = torch.tensor(list(output_ids), dtype=torch.long).unique(return_counts=True)
        logits = logits.clone() if rp == 1.0 else logits
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           prompt_ids=(), output_ids=()) -> int:
    """logits [V] float32 -> one token id (penalties see the sequence's tokens so far)."""
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def prefill(model, tokens: torch.Tensor, slot: int, mixture: torch.Tensor | None) -> torch.Tensor:
    """Run a prompt [T] into KV slot `slot`; returns the last position's logits [V]."""
    T = tokens.shape[0]
    input_pos = torch.arange(T, device=tokens.device)[None]  # [1, T]
    slots = torch.tensor([slot], device=tokens.device)
    mix = None if mixture is None else mixture[None]
    return model(tokens[None], input_pos=input_pos, slots=slots, mixture=mix, last_only=True)[0, -1]


@contextlib.contextmanager
def one_thread_while_compiling(model):
    """While Engine.compile_decode runs, dynamo's trace keeps a core busy: a step on two intra-op
    threads then waits, at every parallel op's barrier, for the thread that shares the tracer's
    core (during a warm-cache compile, 2.4 tok/s eager on two threads, ~37 on one;
    benchmarks/RESULTS.md, eighth session)."""
    if not model.compiling:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# The GIL switch interval while an adapter loads beside the compile (Python's default: 5 ms);
# benchmarks/RESULTS.md, ninth session.
COMPILING_SWITCH_INTERVAL = 1e-4
_switch_holders = [0, None]  # threads inside quick_gil_while_compiling, the interval to restore
_switch_lock = threading.Lock()


@contextlib.contextmanager
def quick_gil_while_compiling(model):
    """While Engine.compile_decode traces (dynamo, AOT autograd: pure Python, which keeps the GIL),
    each torch op of this thread lets the GIL go and then waits up to the switch interval to get it
    back. An adapter load, a run of small ops (it checks and stacks ~200 projections), took a median
    8 s beside a warm-cache compile against 1.5 s alone; with a 100 us interval while it runs, 3 s
    (benchmarks/adapter_load.py).
    Not for decode steps: with it their median speed during the compile fell from ~45 to 3.8 tok/s.
    The interval is the process's: the last thread out restores it."""
    if not model.compiling:
        yield
        return
    with _switch_lock:
        if _switch_holders[0] == 0:
            _switch_holders[1] = sys.getswitchinterval()
            sys.setswitchinterval(COMPILING_SWITCH_INTERVAL)
        _switch_holders[0] += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_holders[0] -= 1
            if _switch_holders[0] == 0:
                sys.setswitchinterval(_switch_holders[1])


def decode_one_token(model, tokens: torch.Tensor, input_pos: torch.Tensor, slots: torch.Tensor,
                     mixture: torch.Tensor | None) -> torch.Tensor:
    """tokens [B], input_pos [B], slots [B], mixture [B, N] -> logits [B, V].

    A lone sequence takes the compiled decode graph when the engine built one
    (Engine.compile_decode), its adapter mixture, if any, passed in as tensors
    (dora.decode_lowrank); a batch in one ascending run of slots the compiled batch graph
    (_decode_rows); scattered slots, mixtures too wide for the graphs and live training run the
    eager forward."""
    compiled = model.compiled_decode
    ctx = model.adapter_context
    if model.compiled_rows is not None and tokens.shape[0] > 1 and (ctx is None or ctx.training is None):
        logits = _decode_rows(model, tokens, input_pos, slots, mixture)
        if logits is not None:
            return logits
    if (compiled is not None and tokens.shape[0] == 1 and (ctx is None or ctx.training is None)
            and int(input_pos[0]) + 1 < model.cache_len):
        lowrank, eager = None, False
        if mixture is not None:
            lowrank, eager = _lone_lowrank(model, ctx, mixture)
        if not eager:
            # Never a ~10 s compile mid-request: a call no graph takes runs eagerly. Only the
            # guards that tell the warm-up's graphs apart are evaluated (slot 0 or not, mixture or
            # not; ~5% of a decode step otherwise, benchmarks/RESULTS.md): everything else the full
            # guards check is fixed while the graph lives or is routed to the eager forward above
            # (several rows, training, the cache's last position, a mixture decode_lowrank cannot
            # take); a new KV cache drops the graph (Transformer.setup_caches).
            with torch.compiler.set_stance("eager_on_recompile", skip_guard_eval_unsafe=True):
                return compiled(tokens[:, None], int(slots[0]) + 2, int(input_pos[0]) + 3, lowrank)[:, -1]
    return model(tokens[:, None], input_pos=input_pos[:, None], slots=slots, mixture=mixture)[:, -1]


def _lone_lowrank(model, ctx, mixture: torch.Tensor) -> tuple[tuple | None, bool]:
    """A lone sequence's mixture for the compiled step: (decode_lowrank's tensors or None, whether
    it must decode eagerly). Kept on the model for the next step: while the sequence decodes, the
    engine hands the same mixture tensor every step (Engine.mixture_matrix) and the context's
    version stays put, so a step costs an identity check here instead of ~0.3-0.8 ms of Python
    (set_mixture's comparison, decode_lowrank's key; benchmarks/RESULTS.md, tenth session).
    Loading or training an adapter, or an eager step with another mixture, bumps the version."""
    cached = model.compiled_lowrank
    if cached is not None and cached[0] is mixture and cached[1] == ctx.version:
        return cached[2], cached[3]
    lowrank, eager = None, False
    ctx.set_mixture(mixture)
    try:
        if ctx.weights is not None:  # the sequence really uses an adapter
            eager = model.compiled_mixture_rank == 0
            if not eager:
                lowrank = decode_lowrank(model, model.compiled_mixture_rank, model.compiled_mixture_dtype)
                eager = lowrank is None
    finally:
        ctx.set_mixture(None)
    model.compiled_lowrank = (mixture, ctx.version, lowrank, eager)
    return lowrank, eager


def _decode_rows(model, tokens, input_pos, slots, mixture) -> torch.Tensor | None:
    """A batch through the compiled batch graph (Transformer.decode_rows), or None when it cannot
    take it: slots that are not one ascending run, the cache's last position, a mixture whose
    adapters' ranks sum past the graph's width."""
    s, p = slots.tolist(), input_pos.tolist()
    length = max(p) + 1
    if s != list(range(s[0], s[0] + len(s))) or length >= model.cache_len:
        return None
    lowrank = None
    if mixture is not None:
        ctx = model.adapter_context
        ctx.set_mixture(mixture)
        try:
            if ctx.weights is not None:
                if model.compiled_rows_rank == 0:
                    return None
                lowrank = decode_lowrank(model, model.compiled_rows_rank, model.compiled_mixture_dtype, rows=len(s))
                if lowrank is None:
                    return None
        finally:
            ctx.set_mixture(None)
    with torch.compiler.set_stance("eager_on_recompile", skip_guard_eval_unsafe=True):
        return model.compiled_rows(tokens[:, None], input_pos[:, None], s[0] + 2, length + 2, lowrank)[:, -1]


class TextStream:
    """Turns a growing list of token ids into text pieces that are always valid UTF-8 and never
    contain (part of) a stop string.

    Byte-level BPE can split one character over several tokens; the decoded tail then ends in
    U+FFFD until the rest arrives, so that tail is held back. Text that could still turn into a stop
    string is held back too.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        for s in self.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.flush()
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        return self._take(len(self.text))

    def finish(self) -> str:
        """The sequence ended: hand out everything, even a dangling partial character (as U+FFFD)."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.flush()

    def _take(self, upto: int) -> str:
        piece = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One request in flight. `mixture` is a {adapter name: weight} dict (validated by the engine)."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    mixture: dict[str, float] | None = None
    cancel: threading.Event | Callable[[], bool] | None = None
    id: int = field(default_factory=lambda: next(_seq_ids))
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    slot: int = -1
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream else ""

    def cancelled(self) -> bool:
        if self.cancel is None:
            return False
        return self.cancel.is_set() if isinstance(self.cancel, threading.Event) else bool(self.cancel())


@dataclass
class StepOutput:
    seq: Sequence
    token: int | None  # None when the sequence ended without a new token (cancelled)
    piece: str
    finished: bool


class Batch:
    """Continuous batching over a fixed pool of KV slots.

    `mixture_matrix(seqs)` maps the batch's sequences to a [B, N] tensor over the resident
    adapters (the engine supplies it, so the scheduler knows nothing about adapters).
    """

    def __init__(self, model, tokenizer: Tokenizer, max_batch: int = 8, max_seq_len: int = 2048,
                 mixture_matrix: Callable[[list[Sequence]], torch.Tensor | None] | None = None,
                 lock=None):
        self.model, self.tokenizer = model, tokenizer
        # Held during each step so adapters cannot be swapped out from under a forward.
        self.lock = lock or threading.RLock()
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len, model.config.max_seq_len)
        self.mixture_matrix = mixture_matrix or (lambda seqs: None)
        self.device = model.model.embed_tokens.weight.device
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch))
        model.setup_caches(max_batch, self.max_seq_len)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> Sequence:
        if not seq.prompt_ids:
            raise EngineError("prompt is empty")
        if len(seq.prompt_ids) >= self.max_seq_len:
            raise ContextLengthExceeded(
                f"prompt has {len(seq.prompt_ids)} tokens; the context holds {self.max_seq_len} (max_seq_len)"
            )
        seq.stream = TextStream(self.tokenizer, seq.params.stop)
        if seq.params.temperature > 0:
            seq.generator = torch.Generator(device="cpu")
            if seq.params.seed is not None:
                seq.generator.manual_seed(seq.params.seed)
            else:
                seq.generator.seed()
        self.waiting.append(seq)
        return seq

    def step(self) -> list[StepOutput]:
        """Admit waiting sequences (prefill), then decode one token for the others."""
        with self.lock, torch.inference_mode(), one_thread_while_compiling(self.model):
            return self._step()

    def _step(self) -> list[StepOutput]:
        out: list[StepOutput] = []
        for seq in [s for s in self.running + self.waiting if s.cancelled()]:
            seq.finish_reason = "cancelled"
            out.append(StepOutput(seq, None, seq.stream.finish() if seq.stream else "", True))
            self._release(seq)
        decoding = sorted(self.running, key=lambda s: s.slot)  # in slot order: a run of slots takes the batch graph
        while self.waiting and self.free_slots:
            seq = self.waiting.pop(0)
            seq.slot = self.free_slots.pop(0)
            self.running.append(seq)
            mix = self.mixture_matrix([seq])
            tokens = torch.tensor(seq.prompt_ids, device=self.device)
            logits = prefill(self.model, tokens, seq.slot, None if mix is None else mix[0])
            token = sample(logits.float().cpu(), seq.params, seq.generator, seq.prompt_ids, seq.output_ids)
            out.append(self._accept(seq, token))
        if decoding:
            last = torch.tensor([s.output_ids[-1] for s in decoding], device=self.device)  # [B]
            pos = torch.tensor([len(s.prompt_ids) + len(s.output_ids) - 1 for s in decoding], device=self.device)
            slots = torch.tensor([s.slot for s in decoding], device=self.device)
            logits = decode_one_token(self.model, last, pos, slots, self.mixture_matrix(decoding)).float().cpu()
            for i, seq in enumerate(decoding):
                token = sample(logits[i], seq.params, seq.generator, seq.prompt_ids, seq.output_ids)
                out.append(self._accept(seq, token))
        for o in out:
            if o.finished and o.seq in self.running:
                self._release(o.seq)
        return out

    def _accept(self, seq: Sequence, token: int) -> StepOutput:
        if token in self.tokenizer.eos_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            return StepOutput(seq, token, seq.stream.finish(), True)
        seq.output_ids.append(token)
        piece = seq.stream.push(token)
        if seq.stream.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        elif len(seq.prompt_ids) + len(seq.output_ids) >= self.max_seq_len:
            seq.finish_reason = "length"  # the next token would not fit in the KV cache
        if seq.finished:
            piece += seq.stream.finish()
        return StepOutput(seq, token, piece, seq.finished)

    def _release(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            self.free_slots.sort()


def generate(model, tokenizer: Tokenizer, seq: Sequence, max_seq_len: int = 2048,
             mixture_matrix=None, callback: Callable[[str], None] | None = None, lock=None) -> Iterator[str]:
    """Generate for one sequence, yielding text pieces (and passing each to `callback`)."""
    batch = Batch(model, tokenizer, max_batch=1, max_seq_len=max_seq_len, mixture_matrix=mixture_matrix, lock=lock)
    batch.add(seq)
    while len(batch):
        for o in batch.step():
            if o.piece:
                if callback is not None:
                    callback(o.piece)
                yield o.piece
