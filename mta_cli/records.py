"""JSONL data intake: read a file of prompt/response records in one of three formats.

Formats (one per file, detected from its first JSON object that has a known key, or forced):

- "prompt": {"prompt": str, "output": str | [str, ...]}            the prompt is already templated
- "alpaca": {"instruction": str, "input"|"context": str, "output"|"response": str | [str, ...]}
            the prompt is built with the Alpaca template (the "with input" one when the input is not blank)
- "chat":   {"messages": [{"role": str, "content": str}, ...]}     the last message is the assistant's
            response; the prompt is the rest rendered by the tokenizer's chat template

A list of outputs gives several references: the first is the training target, all are used by eval.
Other keys are ignored, except "generated_by" ({"model": str, "weights_sha256": str}, written by `mta generate`):
the model whose responses the records hold, collected per file in `Dataset.generated_by`.
The whole file is read and checked before anything is returned, so callers write nothing for a bad file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FORMATS = ("prompt", "alpaca", "chat")
SKIP_HINT = "Fix the record, or pass --skip-invalid to skip invalid records."


@dataclass(frozen=True)
class Record:
    """One example: a fully templated prompt and >= 1 responses (responses[0] is the training target)."""

    prompt: str
    responses: tuple[str, ...]
    line: int  # 1-based line number in the source file

    @property
    def text(self) -> str:
        return self.prompt + self.responses[0]


class DataError(ValueError):
    """A problem with an input data file; str() names the file, the line and the field when known."""

    def __init__(self, path, message: str, line: int | None = None, field: str | None = None, hint: str = SKIP_HINT):
        self.path, self.message, self.line, self.field, self.hint = str(path), message, line, field, hint
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{message}." + (f" {hint}" if hint else ""))

    def __reduce__(self):  # so that a Dataset holding skipped errors can be pickled (e.g. to worker processes)
        return type(self), (self.path, self.message, self.line, self.field, self.hint)


@dataclass
class Dataset:
    """The valid records of one file, with the file's format and sha256 (of its bytes)."""

    path: str
    format: str
    sha256: str
    records: list[Record]
    skipped: list[DataError] = field(default_factory=list)  # invalid records skipped under skip_invalid
    generated_by: list[dict] | None = None  # distinct "generated_by" values of the records; None when none has one


def _kind(value) -> str:
    """JSON-ish name of a value's type, for error messages."""
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _detect_format(obj: dict) -> str | None:
    """The format a JSON object looks like, or None."""
    for key, fmt in (("messages", "chat"), ("prompt", "prompt"), ("instruction", "alpaca")):
        if key in obj:
            return fmt
    return None


class _Reader:
    """Parses the records of one file; `fail` builds a DataError for the current line."""

    def __init__(self, path: str, fmt: str, tokenizer, forced: bool):
        self.path, self.fmt, self.tokenizer, self.forced = path, fmt, tokenizer, forced
        self.line = 0

    def fail(self, message: str, field: str | None = None, hint: str = SKIP_HINT) -> DataError:
        return DataError(self.path, message, self.line, field, hint)

    def get(self, obj: dict, *names: str, required: bool = True):
        """(name, value) of the first of `names` (a field and its aliases) present in obj."""
        for name in names:
            if name in obj:
                return name, obj[name]
        if not required:
            return names[0], None
        message = "missing" + "".join(f" (or its alias {n!r})" for n in names[1:])
        looks = _detect_format(obj)
        if self.forced:
            message += f"; the format {self.fmt!r} was forced with --format"
        else:
            message += f"; the file was detected as {self.fmt!r} format from its first record"
        if looks and looks != self.fmt:
            message += f", but this record looks like {looks!r} format"
        raise self.fail(message, names[0])

    def string(self, obj: dict, *names: str, required: bool = True) -> str | None:
        name, value = self.get(obj, *names, required=required)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"expected a string, got {_kind(value)}", name)
        return value if value is None else self.text(value, name)

    def text(self, value: str, field: str) -> str:
        """`value` if it is valid Unicode text: a lone surrogate ("\\ud800" in JSON) cannot be encoded."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.fail(f"holds a lone surrogate {value[e.start]!r} at character {e.start}, which is not "
                            "text (a broken \\uXXXX escape)", field) from None
        return value

    def responses(self, obj: dict, *names: str) -> tuple[str, ...]:
        name, value = self.get(obj, *names)
        if isinstance(value, str):
            items = [(name, value)]
        elif isinstance(value, list):
            if not value:
                raise self.fail("the list of responses is empty", name)
            items = [(f"{name}[{i}]", r) for i, r in enumerate(value)]
        else:
            raise self.fail(f"expected a string or a list of strings, got {_kind(value)}", name)
        for where, r in items:
            if not isinstance(r, str):
                raise self.fail(f"expected a string, got {_kind(r)}", where)
            if not r.strip():
                raise self.fail("the response is empty", where)
            self.text(r, where)
        return tuple(r for _, r in items)

    def record(self, obj: dict) -> Record:
        if self.fmt == "prompt":
            return Record(self.string(obj, "prompt"), self.responses(obj, "output"), self.line)
        if self.fmt == "alpaca":
            instruction = self.string(obj, "instruction")
            inp = self.string(obj, "input", "context", required=False) or ""  # null counts as no input
            template = ALPACA_PROMPT_WITH_INPUT if inp.strip() else ALPACA_PROMPT
            prompt = template.format(instruction=instruction, input=inp)
            return Record(prompt, self.responses(obj, "output", "response"), self.line)
        return self.chat(obj)

    def origin(self, obj: dict) -> dict | None:
        """The record's "generated_by" (which model wrote its response), or None."""
        value = obj.get("generated_by")
        if value is not None and not (isinstance(value, dict) and all(
                isinstance(value.get(key), str) for key in ("model", "weights_sha256"))):
            raise self.fail("expected an object with the strings 'model' and 'weights_sha256', got "
                            f"{json.dumps(value)[:80]}", "generated_by")
        return value

    def chat(self, obj: dict) -> Record:
        _, messages = self.get(obj, "messages")
        if not isinstance(messages, list):
            raise self.fail(f"expected a list of messages, got {_kind(messages)}", "messages")
        if not messages:
            raise self.fail("the list of messages is empty", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise self.fail(f"expected an object with 'role' and 'content', got {_kind(m)}", f"messages[{i}]")
            for key in ("role", "content"):
                if key not in m:
                    raise self.fail("missing", f"messages[{i}].{key}")
                if not isinstance(m[key], str):
                    raise self.fail(f"expected a string, got {_kind(m[key])}", f"messages[{i}].{key}")
                self.text(m[key], f"messages[{i}].{key}")
        last = len(messages) - 1
        if messages[-1]["role"] != "assistant":
            raise self.fail(f"the last message must be the assistant's response, got role {messages[-1]['role']!r}",
                            f"messages[{last}].role")
        if not messages[-1]["content"].strip():
            raise self.fail("the response is empty", f"messages[{last}].content")
        if last == 0:
            raise self.fail("needs at least one message before the final assistant turn", "messages")
        if self.tokenizer is None:
            raise self.fail("chat records need a tokenizer to render the prompt with its chat template",
                            hint="Pass the tokenizer of the model the data is for.")
        try:
            prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors, raise_exception() in templates, no template at all
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise self.fail("the tokenizer has no chat template", hint="Use a chat model's tokenizer, or "
                                "convert the data to the 'prompt' or 'alpaca' format.") from e
            raise self.fail(f"the chat template failed: {e}", "messages") from e
        return Record(prompt, (messages[-1]["content"],), self.line)


def load_records(path, fmt: str = "auto", tokenizer=None, skip_invalid: bool = False) -> Dataset:
    """Read and validate a JSONL file of records (see the module docstring for the formats).

    fmt: "auto" (detect from the first record) or one of FORMATS. tokenizer: needed for chat records.
    skip_invalid: collect invalid records in Dataset.skipped instead of raising on the first one.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(path, "file not found", hint="Check the path.") from None
    except OSError as e:
        raise DataError(path, f"cannot read the file: {e.strerror}", hint="Check the path.") from None

    reader = _Reader(path, fmt, tokenizer, forced=fmt != "auto")
    records, skipped, origins = [], [], []
    for line, raw in enumerate(data.split(b"\n"), start=1):
        reader.line = line
        if line == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # utf-8 byte order mark
        try:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise reader.fail(f"not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise reader.fail(f"invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise reader.fail(f"expected a JSON object, got {_kind(obj)}")
            if reader.fmt == "auto":
                detected = _detect_format(obj)
                if detected is None:
                    raise reader.fail("cannot detect the format: expected a 'messages' (chat), 'prompt' or "
                                      f"'instruction' (alpaca) key, got keys {sorted(obj)}")
                reader.fmt = detected
            record, origin = reader.record(obj), reader.origin(obj)
            records.append(record)
            if origin is not None and origin not in origins:
                origins.append(origin)
        except DataError as e:
            if not skip_invalid or e.hint != SKIP_HINT:  # errors with another hint are not about one record
                raise
            skipped.append(e)

    if not records:
        if skipped:
            first = str(skipped[0]).removesuffix(" " + SKIP_HINT).removesuffix(".")
            raise DataError(path, f"no valid records: all {len(skipped)} are invalid; the first: {first}", hint="")
        raise DataError(path, "no records (the file is empty or has only blank lines)", hint="")
    return Dataset(path, reader.fmt, hashlib.sha256(data).hexdigest(), records, skipped, origins or None)
