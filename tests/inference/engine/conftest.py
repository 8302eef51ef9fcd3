"""Fixtures for the engine tests: the real default model (loaded once per session) and tiny
random Llama/BitNet checkpoints written with transformers itself."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel

torch.set_num_threads(2)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
TINY_VOCAB = 256 + len(SPECIALS)


def tiny_tokens() -> list[str]:
    return sorted(ByteLevel.alphabet()) + SPECIALS


def write_tiny_tokenizer(path: Path) -> None:
    """Byte-level BPE over the 256 byte symbols (no merges) plus ChatML specials."""
    vocab = {t: i for i, t in enumerate(tiny_tokens())}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML}))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=258, pad_token_id=None,
              rms_norm_eps=1e-5)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    with torch.no_grad():  # non-trivial norms so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def engine(model_cache):
    from inference.engine import Engine

    return Engine.load(cache_dir=model_cache)


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from inference.engine.loaders import default_gguf_path

    return default_gguf_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def tiny_engine(tiny_llama_dir):
    from inference.engine import Engine

    return Engine.load(tiny_llama_dir)


@pytest.fixture
def no_dynamo():
    """transformers' BitNet layers are wrapped in torch.compile; run them eagerly (no C compiler
    round-trips in unit tests, same math)."""
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old
