"""DoRA training for Mining: only the adapter's A, B and magnitude are trained, on response tokens.

    result = train_dora(engine, examples, TrainConfig(rank=8, steps=30), adapter="coding",
                        on_step=lambda step, loss: ..., save_to="out/adapter")
"""

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import dora
from .errors import TrainingError

IGNORE = -100


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    steps: int = 20
    batch_size: int = 4
    grad_accum: int = 1
    seed: int = 0
    target_modules: tuple[str, ...] = dora.DEFAULT_TARGETS
    use_rslora: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 512
    eval_fraction: float = 0.0  # share of examples held out for eval loss
    eval_every: int = 0  # steps between eval losses (0 = only at the end, if there is an eval split)

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "grad_accum", "max_len"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainingError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            raise TrainingError(f"TrainConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class TrainResult:
    adapter: str
    losses: list[float] = field(default_factory=list)  # one per optimiser step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    n_train: int = 0
    n_eval: int = 0
    trainable_params: int = 0
    seconds: float = 0.0
    saved_to: str | None = None


def example_messages(example: dict, index: int) -> list[dict]:
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not any(m.get("role") == "assistant" for m in messages):
            raise TrainingError(f"example {index}: 'messages' must be a list with at least one assistant turn")
        return messages
    if "instruction" in example and "response" in example:
        user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": example["response"]}]
    raise TrainingError(f"example {index}: needs 'messages' or 'instruction' + 'response'")


def encode_example(tokenizer, messages: list[dict], max_len: int, index: int = 0) -> tuple[list[int], list[int]]:
    """Chat-format an example; labels are the token ids on assistant turns and IGNORE elsewhere.

    Assistant spans are located in the rendered text (prefix rendered with the generation prompt
    up to the turn's end), then mapped onto tokens through the tokenizer's character offsets, so
    the end-of-turn marker after each reply is learned too.
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)) if i else 0
        end_text = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(end_text):
            raise TrainingError(f"example {index}: the chat template does not render turns as prefixes")
        spans.append((start, len(end_text)))
    enc = tokenizer.tok.encode(full, add_special_tokens=False)
    ids, labels = list(enc.ids), []
    for tid, (a, _) in zip(enc.ids, enc.offsets):
        labels.append(tid if any(s <= a < e for s, e in spans) else IGNORE)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids, labels = [tokenizer.bos_id, *ids], [IGNORE, *labels]
    return ids[:max_len], labels[:max_len]


def check_only_dora_trainable(model, adapter: str) -> int:
    """Raise TrainingError naming the first trainable parameter that is not this adapter's DoRA
    parameter; return the number of trainable values."""
    allowed = (f"lora_A.{adapter}", f"lora_B.{adapter}", f"lora_magnitude_vector.{adapter}")
    count = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not name.endswith(allowed):
            raise TrainingError(f"parameter {name!r} is trainable but is not a DoRA parameter of adapter {adapter!r}")
        count += p.numel()
    if count == 0:
        raise TrainingError(f"adapter {adapter!r} has no trainable DoRA parameters")
    return count


def _collate(batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        tokens[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return tokens.to(device), labels.to(device)


def _loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Right padding only: the causal mask keeps real tokens from seeing the pads after them.
    logits = model(tokens)  # [B, T, V] float32
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)


def _eval_loss(model, data, batch_size, pad_id, device) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            tokens, labels = _collate(data[i : i + batch_size], pad_id, device)
            k = int((labels[:, 1:] != IGNORE).sum())
            total += float(_loss(model, tokens, labels)) * k
            n += k
    return total / max(n, 1)


def train_dora(engine, examples: list[dict], config: TrainConfig | None = None, adapter: str = "trained",
               init_from: str | Path | None = None, on_step: Callable[[int, float], None] | None = None,
               on_eval: Callable[[int, float], None] | None = None, save_to: str | Path | None = None,
               cancel: Callable[[], bool] | None = None) -> TrainResult:
    """Train DoRA adapter `adapter` on chat examples; the backbone stays frozen (checked)."""
    config = config or TrainConfig()
    if not examples:
        raise TrainingError("no training examples")
    model, tokenizer = engine.model, engine.tokenizer
    data = []
    for i, ex in enumerate(examples):
        ids, labels = encode_example(tokenizer, example_messages(ex, i), config.max_len, i)
        if all(lab == IGNORE for lab in labels[1:]):
            raise TrainingError(f"example {i}: no response tokens left within max_len={config.max_len}")
        data.append((ids, labels))
    rng = random.Random(config.seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    n_eval = int(len(data) * config.eval_fraction)
    eval_data, train_data = [data[i] for i in order[:n_eval]], [data[i] for i in order[n_eval:]]
    if not train_data:
        raise TrainingError("eval_fraction leaves no training examples")

    torch.manual_seed(config.seed)
    if adapter not in engine.adapters:
        if init_from is not None:
            engine.load_adapter(adapter, init_from)
        else:
            engine.new_adapter(adapter, config.rank, config.alpha, config.target_modules, config.use_rslora, config.seed)
    layers = [m for m in dora.dora_modules(model).values() if adapter in m.lora_A]
    params = []
    for layer in layers:
        for d in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            d[adapter].requires_grad_(True)
            params.append(d[adapter])
    ctx = model.adapter_context
    result = TrainResult(adapter=adapter, n_train=len(train_data), n_eval=len(eval_data))
    start = time.perf_counter()
    pad_id = next(iter(tokenizer.eos_ids), 0)
    try:
        result.trainable_params = check_only_dora_trainable(model, adapter)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        ctx.training = adapter
        cursor, epoch_order = 0, list(range(len(train_data)))
        with engine.lock:
            for step in range(1, config.steps + 1):
                if cancel is not None and cancel():
                    break
                step_loss = 0.0
                for _ in range(config.grad_accum):
                    batch = []
                    for _ in range(min(config.batch_size, len(train_data))):
                        if cursor == 0:
                            rng.shuffle(epoch_order)
                        batch.append(train_data[epoch_order[cursor]])
                        cursor = (cursor + 1) % len(train_data)
                    tokens, labels = _collate(batch, pad_id, engine.device)
                    loss = _loss(model, tokens, labels)
                    if not math.isfinite(loss.item()):
                        raise TrainingError(f"loss became {float(loss)} at step {step}; lower lr ({config.lr})")
                    (loss / config.grad_accum).backward()
                    step_loss += loss.item() / config.grad_accum
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                result.losses.append(step_loss)
                if on_step is not None:
                    on_step(step, step_loss)
                at_end = step == config.steps
                if eval_data and ((config.eval_every and step % config.eval_every == 0) or at_end):
                    ev = _eval_loss(model, eval_data, config.batch_size, pad_id, engine.device)
                    result.eval_losses.append((step, ev))
                    if on_eval is not None:
                        on_eval(step, ev)
    finally:
        ctx.training = None
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            for layer in dora.dora_modules(model).values():
                layer.rebuild()  # refresh g_i = m / ||W0 + sBA|| for inference
    result.seconds = time.perf_counter() - start
    if save_to is not None:
        result.saved_to = str(engine.save_adapter(adapter, save_to))
    return result
