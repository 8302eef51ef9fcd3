"""Tokenizer + chat template, read from GGUF metadata or a Hugging Face `tokenizer.json` dir."""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import ModelLoadError

# GGUF token types (llama.cpp): 3 = control (special), 4 = user defined (added, not special).
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, add_bos: bool = False, extra_eos_ids: tuple[int, ...] = ()):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        eos = tok.token_to_id(eos_token) if eos_token else None
        self.eos_ids = frozenset(i for i in (eos, *extra_eos_ids) if i is not None)
        self.add_bos = add_bos and self.bos_id is not None
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages with the model's own Jinja template (the way transformers does)."""
        if not self.chat_template:
            # No template shipped: a plain transcript keeps base models usable.
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, fields: dict, source: str) -> "Tokenizer":
        """Build a byte-level BPE tokenizer from `tokenizer.ggml.*` metadata (the `gpt2` model)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if fields.get("tokenizer.ggml.pre") in ("smollm", "starcoder"):
            # SmolLM2's tokenizer.json splits every digit before the byte-level regex.
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == GGUF_USER_DEFINED]
        tok.add_special_tokens(special)
        tok.add_tokens(user)

        def token(key):
            i = fields.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return cls(tok, chat_template=fields.get("tokenizer.chat_template"), bos_token=token("tokenizer.ggml.bos_token_id"),
                   eos_token=token("tokenizer.ggml.eos_token_id"), add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_dir(cls, path: Path, eos_ids: tuple[int, ...] = ()) -> "Tokenizer":
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{tok_file}: tokenizer.json not found")
        try:
            tok = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exceptions for malformed files
            raise ModelLoadError(f"{tok_file}: cannot parse tokenizer ({e})") from e
        cfg = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        # tokenizer.json may carry its own BOS post-processor; we add BOS only where the config asks.
        tok.post_processor = None
        return cls(tok, chat_template=template, bos_token=_token_content(cfg.get("bos_token")),
                   eos_token=_token_content(cfg.get("eos_token")), add_bos=bool(cfg.get("add_bos_token", False)),
                   extra_eos_ids=eos_ids)

    def save(self, path: Path) -> None:
        self.tok.save(str(path / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
