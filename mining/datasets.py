"""Dataset validation: JSONL (instruction/response or chat messages) and plain text.

Examples come out in the trainer's shape (`inference.engine.train.example_messages`):
`{"instruction", "response"[, "input"]}` or `{"messages": [...]}`. Plain text is split into
paragraphs (blank-line separated); each becomes `{"messages": [{"role": "assistant", ...}]}`,
so the trainer learns the text as the assistant's words (language modelling inside the chat
template, since the trainer only scores assistant turns).
"""

import json

from django.conf import settings

ROLES = ("system", "user", "assistant")
MAX_ERRORS = 20


class DatasetInvalid(ValueError):
    """Every problem found, each naming its line: `errors` is a list of strings."""

    def __init__(self, errors):
        self.errors = errors
        more = "" if len(errors) <= 3 else f" (and {len(errors) - 3} more)"
        super().__init__("; ".join(errors[:3]) + more)


def _check_example(obj):
    """Returns the normalised example or raises ValueError with what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for k, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ValueError(f"messages[{k}] must be an object")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{k}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise ValueError(f"messages[{k}].content must be a non-empty string")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (the reply to learn)")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    missing = [k for k in ("instruction", "response") if k not in obj]
    if missing:
        raise ValueError(f"needs 'instruction' and 'response' (or 'messages'); missing {', '.join(missing)}")
    example = {}
    for key in ("instruction", "response", "input"):
        if key not in obj:
            continue
        if not isinstance(obj[key], str) or (key != "input" and not obj[key].strip()):
            raise ValueError(f"'{key}' must be a non-empty string")
        if obj[key]:
            example[key] = obj[key]
    return example


def parse_dataset(data: bytes, fmt: str) -> list[dict]:
    """Validated examples, or DatasetInvalid listing the problems (line numbers start at 1)."""
    if len(data) > settings.MINING_MAX_DATASET_BYTES:
        raise DatasetInvalid([f"the file is {len(data)} bytes; the limit is {settings.MINING_MAX_DATASET_BYTES}"])
    if b"\x00" in data[:8192]:
        raise DatasetInvalid(["the file is binary, not UTF-8 text"])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetInvalid([f"line {line}: not valid UTF-8 ({exc.reason})"]) from None
    if fmt == "text":
        examples = [{"messages": [{"role": "assistant", "content": para.strip()}]}
                    for para in text.replace("\r\n", "\n").split("\n\n") if para.strip()]
    elif fmt == "jsonl":
        examples, errors = [], []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                examples.append(_check_example(json.loads(line)))
            except json.JSONDecodeError as exc:
                errors.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            except ValueError as exc:
                errors.append(f"line {number}: {exc}")
            if len(errors) >= MAX_ERRORS:
                errors.append(f"stopped after {MAX_ERRORS} errors")
                break
        if errors:
            raise DatasetInvalid(errors)
    else:
        raise DatasetInvalid([f"unknown format {fmt!r}; use jsonl or text"])
    if not examples:
        raise DatasetInvalid(["the dataset is empty: no examples found"])
    if len(examples) > settings.MINING_MAX_DATASET_EXAMPLES:
        raise DatasetInvalid([f"{len(examples)} examples; the limit is {settings.MINING_MAX_DATASET_EXAMPLES}"])
    return examples


def guess_format(filename: str, data: bytes) -> str:
    """jsonl when the name says so or the first non-empty line is a JSON object, else text."""
    if filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    first = next((line for line in data[:65536].splitlines() if line.strip()), b"")
    return "jsonl" if first.lstrip().startswith(b"{") else "text"
