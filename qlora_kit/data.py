"""Load datasets, map every format to chat conversations or raw text, tokenize with exact loss masks, split, cache.

Masks are computed here rather than by the chat template's `{% generation %}` markers, which most templates
(SmolLM2's, Llama 3's, Mistral's) lack: each assistant turn's character span is found by rendering the conversation
up to that turn, and the tokens inside those spans are the ones trained on.
"""

from __future__ import annotations

import bz2
import functools
import glob
import gzip
import hashlib
import json
import logging
import lzma
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from qlora_kit.recipe import (
    FORMAT_FIELDS,
    PAIRED_METHODS,
    PREFERENCE_METHODS,
    ROLE_NAMES,
    DatasetSource,
    QloraKitError,
    Recipe,
    encoding_problem,
    unused_mappings,
)
from qlora_kit.rundir import atomic_folder

log = logging.getLogger("qlora_kit")

ROLES = ROLE_NAMES
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Whole-file compression a text data file may carry (rows.jsonl.gz), by suffix: read as the file inside. Parquet
# compresses inside the file.
COMPRESSIONS = {".gz": gzip, ".bz2": bz2, ".xz": lzma}
# Words in a role name that say which side it is on, for the `roles:` suggestion (bot -> assistant, never user).
ROLE_WORDS = {"assistant": ("assistant", "gpt", "bot", "chatbot", "model", "ai", "agent", "response", "answer",
                            "output", "llm", "claude", "gemini", "bard", "bing", "chatgpt", "completion"),
              "user": ("user", "human", "person", "prompter", "customer", "client", "question", "input", "query",
                       "prompt", "you", "me"),
              "system": ("system", "sys", "instruction", "instructions", "context")}
Conversation = list[dict[str, str]]
# {"messages": Conversation} or {"text": str} (sft); {"prompt", "chosen", "rejected": Conversation} (pairs);
# {"prompt", "completion": Conversation, "label": bool} (kto)
Row = dict[str, Any]

# Named chat templates for `data.chat_template`; "model" keeps the tokenizer's own.
CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
        "{{ '[INST] ' + messages[0]['content'] + '\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
}


class DataError(QloraKitError):
    """A dataset row or file that cannot be trained on; the message names the file and line (or row)."""


@dataclass
class PreparedData:
    """Tokenized splits for the trainer, the held-out conversations for generation metrics, and what was done."""

    train: Dataset
    eval: Dataset | None
    eval_conversations: list[Conversation]
    stats: dict[str, Any] = field(default_factory=dict)
    eval_prompts: list[dict[str, Any]] = field(default_factory=list)  # GRPO: held-out prompt rows with their columns


# ------------------------------------------------------------------------------------------------- reading


def source_files(source: DatasetSource) -> list[str]:
    """The files a local source names: one file, every data file in a folder, or a glob."""
    path = os.path.expanduser(source.path or "")
    if os.path.isdir(path):  # hidden files and folders left out (.git, macOS's ._name copies), as datasets does
        files = sorted(str(p) for p in Path(path).rglob("*") if data_suffix(p) in LOCAL_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif os.path.isfile(path):  # an existing file is itself, even if its name has glob characters ([, ?, *)
        files = [path]
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    else:
        files = []
    if not files:
        what = "a folder with no data files in it" if os.path.isdir(path) else "no data files found"
        raise DataError(f"{path}: {what} (.jsonl, .json, .csv, .parquet, the first three also .gz, .bz2 or .xz; "
                        f"relative paths are read from the current folder, {os.getcwd()})")
    for file in files:
        suffix = data_suffix(file)
        if suffix == ".parquet" and compression_of(file):
            raise DataError(f"{file}: a compressed Parquet file; Parquet compresses inside the file, so give the "
                            f"{suffix} file itself (decompress it)")
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{file}: unsupported file type; use .jsonl, .json, .csv or .parquet (the first three "
                            "may be compressed: .jsonl.gz, .csv.bz2, .json.xz)")
    return files


def data_suffix(path: str | Path) -> str:
    """A data file's type by its name, through a compression suffix, in lower case: .jsonl for rows.jsonl,
    rows.jsonl.gz and ROWS.JSONL."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def compression_of(path: str | Path):
    """The module that decompresses a data file whose name says it is compressed (COMPRESSIONS), else None."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def read_data_bytes(path: str) -> bytes:
    """A data file's bytes, decompressed where its name says it is compressed; a file that is not what its name
    says is one message with the fix."""
    data = Path(path).read_bytes()
    module = compression_of(path)
    if module is None:
        if data[:2] == b"\x1f\x8b":  # gzip's magic bytes under a plain name
            raise DataError(f"{path}: the file is gzip-compressed; name it {Path(path).name}.gz, or decompress it")
        return data
    try:
        return module.decompress(data)
    except Exception as exc:  # gzip.BadGzipFile, OSError, EOFError, lzma.LZMAError: every damaged archive
        name = module.__name__
        raise DataError(f"{path}: cannot be decompressed as {name} ({type(exc).__name__}: {exc}); the file is "
                        f"damaged or not {name}: compress it again, or give the file uncompressed") from None


def read_records(path: str) -> list[tuple[str, Any]]:
    """(location, record) pairs; locations are 'file: line N' for JSON and 'file: row N' for tables."""
    suffix = data_suffix(path)
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        text = read_utf8(path)
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        records = parsed_json(text, whole_file=True)
        if isinstance(records, BadRecord):
            raise DataError(f"{path}: {records.reason}")
        if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
            records = next(iter(records.values()))  # {"data": [...]} layout
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json dataset must be a list of rows, got {type(records).__name__}")
        return [(f"{path}: row {i}", r) for i, r in enumerate(records, start=1)]
    return read_table(path, suffix)


def read_table(path: str, suffix: str) -> list[tuple[str, Any]]:
    """CSV and Parquet through `datasets`; an unreadable file is one message naming it, not a pyarrow traceback."""
    from datasets import load_dataset

    text = read_utf8(path) if suffix == ".csv" else None  # read_utf8: pandas' decode error names no line, no fix
    if os.path.getsize(path) == 0 or text == "":
        raise DataError(f"{path}: the file is empty")
    if text is not None:
        check_csv_fields(path, text)
    elif parquet_rows(path) == 0:
        raise DataError(f"{path}: the Parquet table has no rows")
    kind = suffix.lstrip(".").upper()
    # datasets logs a damaged file at ERROR before it raises; the DataError below says it once, with the fix
    datasets_log = logging.getLogger("datasets")
    level = datasets_log.level
    datasets_log.setLevel(logging.CRITICAL)
    try:
        table = load_dataset(LOCAL_SUFFIXES[suffix], data_files=path, split="train")
    except Exception as exc:  # datasets wraps pyarrow / pandas errors of every kind in DatasetGenerationError
        cause = root_cause(exc)
        raise DataError(f"{path}: cannot be read as {kind} ({type(cause).__name__}: {str(cause)[:200]}); the file is "
                        f"damaged or not {kind}: export it again") from None
    finally:
        datasets_log.setLevel(level)
    return [(f"{path}: row {i}", r) for i, r in enumerate(table, start=1)]


def check_csv_fields(path: str, text: str) -> None:
    """Every CSV row has the header's number of fields, and there is a row. pandas reads one field more in every row
    as an index column (the columns shift by one, silently), and a row with one more elsewhere only as a damaged
    file; a field holding the separator unquoted is the usual cause."""
    import csv
    import io

    reader = csv.reader(io.StringIO(text), strict=True)
    rows = 0
    try:
        header = next(reader, [])
        records = list(reader)
    except csv.Error:
        return  # an unclosed quote and the like: the CSV reader's own error names it
    twice = next((name for i, name in enumerate(header) if name in header[:i]), None)
    if twice is not None:  # pandas would rename the second to f"{twice}.1" and train on the first alone
        raise DataError(f"{path}: the column {twice!r} appears twice in the header; rename or drop one")
    for record in records:
        if not record:
            continue  # a blank line: pandas skips it too
        rows += 1
        if len(record) != len(header):
            raise DataError(f"{path}: row {rows}: {len(record)} fields where the header has "
                            f"{len(header)}; quote a field that holds a comma (\"a, b\"), or fix the row")
    if not rows:
        raise DataError(f"{path}: no rows below the header")


def parquet_rows(path: str) -> int | None:
    """Rows in a Parquet file by its footer, or None where it cannot be read (the reader then says why)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # a damaged file: load_dataset's error, with the fix, follows
        return None


def root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def read_utf8(path: str) -> str:
    """A data file's text (a UTF-8 byte-order mark is allowed); another encoding is one message with the fix."""
    data = read_data_bytes(path)
    try:
        text = data.decode("utf-8-sig")
        if "\0" in text:  # UTF-16 without a byte-order mark decodes as "UTF-8" with a NUL before every ASCII byte
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        return text
    except UnicodeDecodeError as exc:
        binary = next((what for magic, what in BINARY_FILES.items() if data.startswith(magic)), None)
        if binary:
            raise DataError(f"{path}: holds {binary}, not {data_suffix(path)} text") from None
        problem = encoding_problem(data, exc)
        encoding = next((name for name in ("UTF-32", "UTF-16") if name in problem), "CP1252")
        raise DataError(f"{path}: {problem}; re-save it as UTF-8 (e.g. `iconv -f {encoding} -t UTF-8 IN > OUT`, "
                        "or your editor's 'Save with encoding: UTF-8')") from None


# binary files found where text was expected (inside a .gz, or under a text name), by their first bytes
BINARY_FILES = {b"PAR1": "a Parquet table (name it .parquet, uncompressed: Parquet compresses inside)",
                b"PK\x03\x04": "a zip archive (unzip it: qlora-kit reads .gz, .bz2 and .xz)",
                b"\x1f\x8b": "gzip data inside (compressed twice? decompress it once more)",
                b"\x00\x05\x16\x07": "a macOS resource fork (an ._ copy: delete it)"}


def read_jsonl(path: str) -> list[tuple[str, Any]]:
    """One record per line. Lines end at LF, CRLF or CR only: str.splitlines would also cut at U+2028, U+2029 and
    U+0085, which JSON strings may hold unescaped."""
    return [(f"{path}: line {number}", parsed_json(line))
            for number, line in enumerate(re.split(r"\r\n|\r|\n", read_utf8(path)), start=1) if line.strip()]


# a \u escape of a UTF-16 surrogate (D800-DFFF): json.loads turns an unpaired one into a str no tokenizer encodes
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def parsed_json(text: str, whole_file: bool = False) -> Any:
    """json.loads(text), or a BadRecord saying why not: invalid JSON (with its line in a whole file),
    nesting too deep for Python, an integer too long to convert, or text that is not valid Unicode (half a
    surrogate pair, written as an escape)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord(f"{f'line {exc.lineno}: ' if whole_file else ''}invalid JSON: {exc.msg}")
    except RecursionError:
        return BadRecord("invalid JSON: nested too deeply to read")
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        return BadRecord(f"invalid JSON: {exc}")
    if SURROGATE_ESCAPE.search(text) and not valid_unicode(value):
        return BadRecord("a \\uD800-\\uDFFF escape without its other half: not valid Unicode text; write the "
                         "character itself, or both escapes of its surrogate pair")
    return value


def valid_unicode(value: Any) -> bool:
    """Every string in a parsed JSON value encodes as UTF-8 (no unpaired surrogate)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


@dataclass
class BadRecord:
    """A line that could not be parsed, kept so `on_bad_rows: skip` can count it and `error` can report it."""

    reason: str


def read_hub(source: DatasetSource) -> list[tuple[str, Any]]:
    from datasets import load_dataset

    if saved_dataset(source.hub) or os.path.isfile(os.path.expanduser(source.hub)):
        raise DataError(f"data: hub: {source.hub} is a local {'folder' if os.path.isdir(source.hub) else 'file'}; "
                        "name it with `path:` instead of `hub:`")
    try:
        table = load_dataset(source.hub, source.config, split=source.split, revision=source.revision)
    except Exception as exc:  # datasets raises many types for "offline" / "not found"
        if "Unknown split" in str(exc):  # the dataset is there: only the split is wrong
            raise DataError(f"data: hub dataset '{source.hub}': {str(exc)[:200]}; set the entry's `split`") from None
        raise DataError(f"data: hub dataset '{source.hub}' could not be loaded ({type(exc).__name__}: "
                        f"{str(exc)[:200]}). Offline? Download it once with network, or point `path` at local "
                        "files") from None
    return [(f"{source.hub}[{source.split}][{i}]", r) for i, r in enumerate(table)]  # as the dataset indexes it


def read_source(source: DatasetSource) -> Iterator[tuple[str, Any]]:
    if source.hub:
        yield from read_hub(source)
        return
    if saved_dataset(source.path):
        yield from read_saved_dataset(source)
        return
    if source.split != "train":
        raise DataError(f"{source.path}: split '{source.split}' applies to a Hub dataset or a datasets save_to_disk "
                        "folder, not to data files (which are read whole); drop `split`, or name the files to read")
    for path in source_files(source):
        yield from read_records(path)


def saved_dataset(path: str | None) -> bool:
    """A folder `datasets` wrote with save_to_disk: a Dataset (state.json, dataset_info.json) or a DatasetDict
    (dataset_dict.json), read with load_from_disk, not as the JSON files in it."""
    folder = Path(os.path.expanduser(path or ""))
    return folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()))


def read_saved_dataset(source: DatasetSource) -> list[tuple[str, Any]]:
    """The rows of a save_to_disk folder; of a DatasetDict, those of the entry's `split`."""
    from datasets import DatasetDict, load_from_disk

    path = os.path.expanduser(source.path)
    try:
        table = load_from_disk(path)
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise DataError(f"{path}: a datasets save_to_disk folder that cannot be read ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); save it again") from None
    if isinstance(table, DatasetDict):
        if source.split not in table:
            raise DataError(f"{path}: the saved DatasetDict has no split '{source.split}'; set the entry's `split` to "
                            f"one of {', '.join(table)}")
        table = table[source.split]
    return [(f"{path}[{source.split}]: row {i}", row) for i, row in enumerate(table, start=1)]


# ------------------------------------------------------------------------------------------------ formats


OPTIONAL_FIELDS = {"input"}  # alpaca's input may be absent
PREFERENCE_FORMATS = ("preference", "unpaired")


def detect_format(record: Any, fields: dict[str, str], method: str = "sft") -> str:
    keys = set(record) if isinstance(record, dict) else set()

    def has(*names: str) -> bool:
        return all(fields.get(n, n) in keys for n in names if n not in OPTIONAL_FIELDS)

    if method in PREFERENCE_METHODS:
        if has("chosen", "rejected"):
            return "preference"
        if method == "kto" and has("prompt", "completion", "label"):
            return "unpaired"
        wanted = "`prompt`/`completion`/`label` (unpaired) or " if method == "kto" else ""
        raise DataError(f"method {method} trains on preference rows: {wanted}`chosen`/`rejected` (with a `prompt`, "
                        f"or as conversations that share their opening turns); this row has fields {sorted(keys)} "
                        "(map yours with the dataset's `fields`, e.g. {chosen: better, rejected: worse})")
    if method == "sft" and has("prompt", "completion", "label"):
        raise DataError("the rows carry a `label` (KTO's desirable / undesirable answers): method sft would train on "
                        "every completion, the undesirable ones too; set `method: kto`, or drop the label field")
    for fmt, names in FORMAT_FIELDS.items():
        if fmt not in PREFERENCE_FORMATS and has(*names):
            return fmt
    pairs = " (chosen/rejected pairs train a preference method: set `method: dpo`, orpo or simpo)" \
        if has("chosen", "rejected") else ""
    raise DataError(f"cannot tell the row format from its fields {sorted(keys)}; expected `messages`, "
                    "`conversations` (sharegpt), `instruction`/`output` (alpaca), `prompt`/`completion` or `text` "
                    f"(or set the dataset's `format` and `fields`){pairs}")


def field_of(record: dict, name: str, source: DatasetSource, required: bool = True) -> Any:
    column = source.fields.get(name, name)
    if column not in record:
        if not required:
            return None
        renamed = f" (mapped from '{name}' by fields)" if column != name else ""
        raise DataError(f"missing field '{column}'{renamed}; the row has columns {sorted(record)}. Map yours with "
                        f"`fields: {{{name}: <column>}}`")
    return record[column]


def to_row(record: Any, fmt: str, source: DatasetSource) -> Row:
    """One raw record in any supported format -> {"messages": [...]} or {"text": ...}."""
    if isinstance(record, BadRecord):
        raise DataError(record.reason)
    if not isinstance(record, dict):
        raise DataError(f"a row must be a JSON object, got {type(record).__name__}")
    if fmt == "text":
        text = field_of(record, "text", source)
        if not isinstance(text, str) or not text.strip():
            raise DataError("field 'text' is empty or not a string")
        return {"text": text}
    if fmt == "preference":
        return preference_row(record, source)
    if fmt == "unpaired":
        return unpaired_row(record, source)
    if fmt == "messages":
        return {"messages": check_turns(field_of(record, "messages", source), source.roles)}
    if fmt == "sharegpt":
        return {"messages": check_turns(sharegpt_turns(field_of(record, "conversations", source), source))}
    if fmt == "alpaca":
        instruction = field_of(record, "instruction", source)
        extra = field_of(record, "input", source, required=False)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"field 'input' must be text (or empty), got {type(extra).__name__} {extra!r:.40}")
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": field_of(record, "output",
                                                                                               source)}]
        return {"messages": check_turns(turns)}
    prompt, completion = field_of(record, "prompt", source), field_of(record, "completion", source)
    return {"messages": check_turns(as_turns(prompt, "user") + as_turns(completion, "assistant"))}


def sharegpt_turns(conversations: Any, source: DatasetSource) -> Conversation:
    if not isinstance(conversations, list):
        raise DataError(f"'conversations' must be a list of {{from, value}} turns, got {type(conversations).__name__}")
    roles = {**SHAREGPT_ROLES, **source.roles}
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"turn {i}: expected {{from, value}}, got {turn!r:.80}")
        if not isinstance(turn["from"], str):
            raise DataError(f"turn {i}: 'from' must be a string such as 'human', got {turn['from']!r:.60}")
        if turn["from"] not in roles:
            raise DataError(f"turn {i}: unknown role {turn['from']!r}; map it with {role_suggestion(turn['from'])} "
                            f"in the dataset's entry (known: {', '.join(sorted(roles))})")
        turns.append({"role": roles[turn["from"]], "content": turn["value"]})
    return turns


def role_suggestion(name: Any) -> str:
    """The `roles:` mapping that keeps a role name's meaning: gpt/bot/model -> assistant, human -> user."""
    words = re.split(r"[^a-z]+", str(name).lower())
    for role, known in ROLE_WORDS.items():
        if any(word in known or word.startswith(("gpt", "bot")) and role == "assistant" for word in words if word):
            return f"`roles: {{{name}: {role}}}`"
    return f"`roles: {{{name}: assistant}}` if it is the model's side, `{{{name}: user}}` if it is the person's"


def as_turns(value: Any, role: str) -> Conversation:
    """A plain-text prompt/completion becomes one turn; a conversational one is already a list of turns."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"the {role} side must be a string or a list of turns, got {type(value).__name__}")


def check_format_fits_method(fmt: str, method: str) -> None:
    if fmt == "auto":
        return
    if method in PREFERENCE_METHODS and fmt not in PREFERENCE_FORMATS:
        raise DataError(f"method {method} trains on preference rows; the dataset's format is {fmt!r} (use format: "
                        "preference, or unpaired for kto)")
    if method in PAIRED_METHODS and fmt == "unpaired":
        raise DataError(f"unpaired rows (prompt/completion/label) train method kto only; method {method} needs "
                        "chosen/rejected pairs")
    if method == "sft" and fmt in PREFERENCE_FORMATS:
        raise DataError(f"format {fmt} trains a preference method; set the recipe's `method` (dpo, orpo, kto, simpo)")


def clean_turns(messages: Any, roles: dict[str, str] | None = None) -> Conversation:
    """A list of {role, content} turns with known roles and non-empty text; `roles` renames role names first (a
    dataset's `roles:` mapping)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of {{role, content}} turns, got {messages!r:.80}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"turn {i}: expected {{role, content}}, got {turn!r:.80}")
        if not isinstance(turn["role"], str):
            raise DataError(f"turn {i}: the role must be a string such as 'user', got {turn['role']!r:.60}")
        role = (roles or {}).get(turn["role"], turn["role"])
        if turn.get("tool_calls") or role in ("tool", "function", "ipython"):
            raise DataError(f"turn {i} ({turn['role']}): a tool call or tool result; qlora-kit trains on text "
                            "turns only, so tool-calling conversations are not read (drop these rows, or skip them "
                            "with data.on_bad_rows: skip)")
        if role not in ROLES:
            raise DataError(f"turn {i}: unknown role {turn['role']!r}; use one of {', '.join(ROLES)}, or map it "
                            f"with {role_suggestion(turn['role'])} in the dataset's entry")
        turns.append({"role": role, "content": turn_text(turn["content"], f"turn {i} ({role})")})
    return turns


def turn_text(content: Any, where: str) -> str:
    """A turn's text: a string, or OpenAI's list of content parts ([{"type": "text", "text": ...}], what its chat and
    fine-tuning formats write), joined as OpenAI joins them. Parts of another type (images, audio) are refused: the
    models trained here read text only."""
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{where}: content part {part!r:.60} is not a text part ({{\"type\": \"text\", "
                                "\"text\": ...}); qlora-kit trains text models, so only text parts can be read")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"{where}: content is empty or not a string (or a list of text parts)")
    return content


def check_turns(messages: Any, roles: dict[str, str] | None = None) -> Conversation:
    """Validated {role, content} turns of a conversation the model learns to finish."""
    turns = clean_turns(messages, roles)
    if turns[-1]["role"] != "assistant":
        raise DataError(f"the conversation ends on a {turns[-1]['role']} turn; it must end on an assistant turn, "
                        "which is what the model learns to write")
    return turns


def check_prompt(prompt: Any) -> Conversation:
    """The prompt of a preference or unpaired row: turns ending on the user turn the answers reply to."""
    turns = clean_turns(as_turns(prompt, "user"))
    if turns[-1]["role"] != "user":
        raise DataError(f"the prompt ends on a {turns[-1]['role']} turn; it must end on the user turn that the "
                        "answers reply to")
    return turns


def check_answer(answer: Any, name: str) -> Conversation:
    """One answer of a preference or unpaired row: a string or one assistant turn."""
    if isinstance(answer, str) and not answer.strip():
        raise DataError(f"'{name}' is empty")
    try:
        turns = clean_turns(as_turns(answer, "assistant"))
    except DataError as exc:
        raise DataError(f"'{name}': {exc}") from None
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise DataError(f"'{name}' must be one assistant turn (or a string), got roles "
                        f"{[t['role'] for t in turns]}")
    return turns


def preference_row(record: dict, source: DatasetSource) -> Row:
    """prompt/chosen/rejected as strings or turns; without a prompt, chosen and rejected are whole conversations
    whose shared opening turns are the prompt (UltraFeedback's layout)."""
    chosen, rejected = field_of(record, "chosen", source), field_of(record, "rejected", source)
    prompt = field_of(record, "prompt", source, required=False)
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError("no 'prompt' field, and 'chosen'/'rejected' are not conversations to take it from; add "
                            "a prompt (or map it with `fields: {prompt: <column>}`)")
        chosen, rejected = clean_turns(chosen), clean_turns(rejected)
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError("'chosen' and 'rejected' share no opening turn, so there is no prompt to take from them")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    row = {"prompt": check_prompt(prompt), "chosen": check_answer(chosen, "chosen"),
           "rejected": check_answer(rejected, "rejected")}
    if row["chosen"] == row["rejected"]:
        raise DataError("'chosen' and 'rejected' are identical; the pair teaches nothing")
    return row


def unpaired_row(record: dict, source: DatasetSource) -> Row:
    """KTO's rows: a prompt, one completion, and whether that completion is desirable."""
    label = field_of(record, "label", source)
    if not isinstance(label, bool):
        raise DataError(f"'label' must be true (desirable) or false (undesirable), got {label!r:.40}")
    return {"prompt": check_prompt(field_of(record, "prompt", source)),
            "completion": check_answer(field_of(record, "completion", source), "completion"), "label": label}


def with_system_prompt(row: Row, system_prompt: str | None) -> Row:
    key = "messages" if "messages" in row else "prompt"
    if not system_prompt or key not in row or row[key][0]["role"] == "system":
        return row
    return {**row, key: [{"role": "system", "content": system_prompt}, *row[key]]}


@dataclass
class BadRows:
    """Rows skipped under `on_bad_rows: skip`: a count and the first few reasons, so nothing vanishes silently."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)


def load_rows(source: DatasetSource, system_prompt: str | None, bad: BadRows | None = None,
              method: str = "sft") -> list[Row]:
    """Every row of one source, normalised for the training method; a bad row raises (naming file and line) or is
    counted in `bad`."""
    fmt = source.format

    detected_at = None  # the record the format was detected from (None: the dataset's `format` names it)

    def normalised(where: str, record: dict) -> Row:
        nonlocal fmt, detected_at
        if fmt == "auto":
            fmt = detect_format(record, source.fields, method)
            check_mappings_used(source, fmt)
            detected_at = where
        check_format_fits_method(fmt, method)
        try:
            return with_system_prompt(to_row(record, fmt, source), system_prompt)
        except DataError as exc:
            raise DataError(f"{exc}{other_format_hint(record, fmt, source, method, detected_at)}") from None

    return rows_of(source, normalised, bad)


def other_format_hint(record: Any, fmt: str, source: DatasetSource, method: str, first: str | None) -> str:
    """Where a row fails its source's format but has another format's fields, say so: the format is one per source,
    detected from its first row, so a folder or file mixing formats fails on the first row of the other kind."""
    if not first or not isinstance(record, dict):
        return ""
    try:
        other = detect_format(record, source.fields, method)
    except DataError:
        return ""
    if other == fmt:
        return ""
    return (f" (the row looks like format {other}, but {first} made this source format {fmt}: a file, folder or "
            "glob holds one format; give each format its own data.datasets entry)")


def rows_of(source: DatasetSource, convert: Callable[[str, dict], Row], bad: BadRows | None) -> list[Row]:
    """`convert(where, record)` of every record of one source; a bad one raises naming its file and line, or (with
    `bad`) is counted and skipped. A source left with no rows is an error either way."""
    rows = []
    for where, record in read_source(source):
        try:
            if isinstance(record, BadRecord):
                raise DataError(record.reason)
            rows.append(convert(where, record))
        except DataError as exc:
            if bad is None:
                raise DataError(f"{where}: {exc}") from None
            bad.add(f"{where}: {exc}")
    if not rows:
        raise DataError(f"{source.path or source.hub}: no usable rows")
    return rows


def check_mappings_used(source: DatasetSource, fmt: str) -> None:
    """A `fields`/`roles` entry the detected format never reads would silently do nothing."""
    unused = unused_mappings(source, fmt)
    if unused:
        raise QloraKitError(f"{source.path or source.hub}: {unused[0]}: never used: the rows were detected as format "
                            f"{fmt}, which reads {', '.join(FORMAT_FIELDS[fmt])}; remove it, or set the dataset's "
                            "`format` and map the fields that format reads")


def load_conversations(source: DatasetSource, system_prompt: str | None) -> list[Conversation]:
    """The conversations of a chat-style source, erroring on the first bad row."""
    return [row["messages"] for row in load_rows(source, system_prompt) if "messages" in row]


def mix_sources(recipe: Recipe, bad: BadRows | None) -> list[Row]:
    """Concatenate sources, or sample them by `weight` (rows per source = weight x its size, seeded)."""
    rng = random.Random(recipe.data.seed)
    mixed = []
    for source in recipe.data.datasets:
        mixed += weighted(load_rows(source, recipe.data.system_prompt, bad, recipe.method), source, rng)
    return mixed


def weighted(rows: list, source: DatasetSource, rng: random.Random) -> list:
    """A source's rows at its `weight`: weight x len(rows) of them, whole copies then a seeded sample; a weight that
    leaves none is an error naming it (training would otherwise start with no rows from it)."""
    if source.weight is None or source.weight == 1.0:
        return rows
    target = round(len(rows) * source.weight)
    if not target:
        raise DataError(f"{source.path or source.hub}: weight {source.weight:g} x {len(rows)} rows rounds to no "
                        f"rows; raise its weight to at least {0.5 / len(rows):.2g}, or drop the source")
    whole, part = divmod(target, len(rows))
    return rows * whole + rng.sample(rows, part)


# --------------------------------------------------------------------------------------------- templates


def resolve_chat_template(name: str | None, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """`data.chat_template`: a named template, inline Jinja, or None/'model' for the tokenizer's own."""
    if name in (None, "model"):
        return tokenizer.chat_template
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    return name  # inline Jinja (the recipe check made sure it looks like a template)


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn tokens)."""
    full = render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        end_text = render(tokenizer, messages[: i + 1])
        if not full.startswith(end_text) or start > len(end_text):
            raise DataError("the chat template does not render conversations incrementally (turn "
                            f"{i} renders differently inside the full conversation), so assistant turns cannot be "
                            "located; set data.loss_on: all, or use a template without history rewriting")
        spans.append((start, len(end_text)))
    return full, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Conversation, loss_on: str) -> dict:
    """input_ids plus `assistant_masks` (1 = trained on), the column trl's SFTTrainer turns into labels.

    If the template closes the last assistant turn with no EOS (or end-of-turn) token, EOS is appended and trained
    on, so the model learns to stop.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded.input_ids)
    if loss_on == "all":
        mask = [1] * len(ids)
    else:
        # A token is trained if it overlaps an assistant span: BPE can merge the space before the content into the
        # content's first token, which must still be learned.
        mask = [int(end > start and any(start < e and end > s for s, e in spans))
                for start, end in encoded.offset_mapping]
    if not ends_turn(tokenizer, ids, mask):
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return {"input_ids": ids, "assistant_masks": mask}


def ends_turn(tokenizer: PreTrainedTokenizerBase, ids: list[int], mask: list[int]) -> bool:
    """Whether the last trained span contains EOS or a special token (the template's end-of-turn marker)."""
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    if not trained:
        return True  # nothing trained (e.g. loss_on: completion with no assistant tokens): nothing to add
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return any(i in special for i in trained[-4:])


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> dict:
    """Raw text for continued pre-training: BOS if the tokenizer uses one, the text, EOS; every token trained."""
    ids = tokenizer(text, add_special_tokens=True).input_ids
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = [*ids, tokenizer.eos_token_id]
    return {"input_ids": ids, "assistant_masks": [1] * len(ids)}


def tokenize_row(tokenizer: PreTrainedTokenizerBase, row: Row, loss_on: str) -> dict:
    if "text" in row:
        return tokenize_text(tokenizer, row["text"])
    return tokenize_conversation(tokenizer, row["messages"], loss_on)


def tokenize_answer(tokenizer: PreTrainedTokenizerBase, prompt: Conversation,
                    answer: Conversation) -> tuple[list, list]:
    """(prompt ids, answer ids) of one prompt and its answer, rendered and split exactly where SFT's loss mask of the
    same conversation starts, so an SFT-then-DPO run sees the same prompt tokens; EOS is appended to the answer when
    the template closes the turn without one, as SFT does."""
    text, spans = assistant_spans(tokenizer, prompt + answer)
    start = spans[sum(turn["role"] == "assistant" for turn in prompt)][0]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded.input_ids)
    cut = next((i for i, (s, e) in enumerate(encoded.offset_mapping) if e > s and e > start), len(ids))
    answer_ids = ids[cut:]
    if not ends_turn(tokenizer, answer_ids, [1] * len(answer_ids)):
        answer_ids.append(tokenizer.eos_token_id)
    return ids[:cut], answer_ids


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, row: Row, max_prompt_length: int | None) -> dict:
    """prompt_ids / chosen_ids / rejected_ids, the columns trl's preference trainers train on. The prompt is the
    tokens both sides share (a BPE merge across the prompt's end can differ between the answers)."""
    prompt_c, chosen = tokenize_answer(tokenizer, row["prompt"], row["chosen"])
    prompt_r, rejected = tokenize_answer(tokenizer, row["prompt"], row["rejected"])
    full_c, full_r = prompt_c + chosen, prompt_r + rejected
    shared = min(common_prefix_length(full_c, full_r), len(prompt_c), len(prompt_r))
    prompt = full_c[:shared]
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length:]
    return {"prompt_ids": prompt, "chosen_ids": full_c[shared:], "rejected_ids": full_r[shared:]}


def tokenize_unpaired(tokenizer: PreTrainedTokenizerBase, prompt: Conversation, completion: Conversation, label: bool,
                      max_prompt_length: int | None) -> dict:
    prompt_ids, completion_ids = tokenize_answer(tokenizer, prompt, completion)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length:]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label}


def unpair(rows: list[Row]) -> list[Row]:
    """Preference pairs as KTO rows: the chosen answer desirable, the rejected one undesirable (as trl's
    unpair_preference_dataset does); unpaired rows pass through."""
    out = []
    for row in rows:
        if "chosen" in row:
            out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
            out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
        else:
            out.append(row)
    return out


def apply_answer_length_policy(tokenized: list[dict], max_length: int, policy: str) -> tuple[list, dict]:
    """Preference rows over max_length (prompt + longest answer): answers truncated (keep the start) or the row
    dropped; a row whose prompt alone fills max_length keeps no answer token and is dropped."""
    kept, truncated, dropped, emptied = [], 0, 0, 0
    for row in tokenized:
        answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in row]
        room = max_length - len(row["prompt_ids"])
        if room <= 0:
            emptied += 1
            continue
        if any(len(row[c]) > room for c in answers):
            if policy == "drop":
                dropped += 1
                continue
            truncated += 1
            row = {**row, **{c: row[c][:room] for c in answers}}
        kept.append(row)
    return kept, {"truncated": truncated, "dropped_too_long": dropped, "dropped_no_trained_tokens": emptied}


# ---------------------------------------------------------------------------------------------- length policy


def apply_length_policy(tokenized: list[dict], max_length: int, policy: str) -> tuple[list, dict]:
    """Truncate (keep the start) or drop rows over max_length; rows left with no trained token are dropped too."""
    kept, truncated, dropped, emptied = [], 0, 0, 0
    for row in tokenized:
        if len(row["input_ids"]) > max_length:
            if policy == "drop":
                dropped += 1
                continue
            truncated += 1
            row = {k: v[:max_length] for k, v in row.items()}
        if not any(row["assistant_masks"]):
            emptied += 1
            continue
        kept.append(row)
    return kept, {"truncated": truncated, "dropped_too_long": dropped, "dropped_no_trained_tokens": emptied}


# ------------------------------------------------------------------------------------------------ splitting


def split_validation(rows: list, recipe: Recipe) -> tuple[list, list]:
    """Hold out a fraction, a count, or a separate file, with a fixed seed."""
    d = recipe.data
    if d.validation is None:
        return rows, []
    if isinstance(d.validation, str):
        source = DatasetSource(path=d.validation)
        return rows, load_rows(source, recipe.data.system_prompt, method=recipe.method)
    order = list(range(len(rows)))
    random.Random(d.seed).shuffle(order)
    count = d.validation if isinstance(d.validation, int) else max(1, round(d.validation * len(rows)))
    if count >= len(rows):
        raise DataError(f"{recipe.source}: data.validation: {d.validation} leaves no training rows out of "
                        f"{len(rows)}")
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# -------------------------------------------------------------------------------------------------- cache


def cache_key(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything the tokenized data depends on: data section, file contents, tokenizer, template, length,
    and the code that builds it (tokenization_code)."""
    digest = hashlib.sha256()
    digest.update(tokenization_code().encode())
    digest.update(json.dumps(asdict(recipe.data), sort_keys=True, default=str).encode())
    digest.update(f"{recipe.training.max_length}:{recipe.method}:{recipe.preference.max_prompt_length}".encode())
    digest.update(json.dumps(tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else "", sort_keys=True)
                  .encode())
    digest.update((tokenizer.chat_template or "").encode())
    digest.update(f"{tokenizer.eos_token_id}:{tokenizer.pad_token_id}".encode())
    files = [f for s in recipe.data.datasets if s.path for f in source_files(s)]
    if isinstance(recipe.data.validation, str):
        files.append(recipe.data.validation)
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


@functools.cache
def tokenization_code() -> str:
    """What the cached rows and stats depend on besides the recipe and the data: this module's source (how rows are
    read, masked and counted) and the tokenizer libraries' versions. A cache built by other code is never read, so an
    upgrade cannot serve rows or stats of an older format (one from before speed.shared_prefix lacked the packed pair
    lengths the memory estimate reads)."""
    import tokenizers
    import transformers

    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return f"{source}:{transformers.__version__}:{tokenizers.__version__}"


def data_cache_dir() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit")) / "data"


def load_cached(key: str) -> PreparedData | None:
    folder = data_cache_dir() / key
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text())
    evaluation = load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    return PreparedData(load_from_disk(str(folder / "train")), evaluation, meta["eval_conversations"], meta["stats"])


def store_cached(key: str, data: PreparedData) -> None:
    folder = data_cache_dir() / key
    with atomic_folder(folder, replace=False) as tmp:  # another rank may finish first: keep its copy
        data.train.save_to_disk(str(tmp / "train"))
        if data.eval is not None:
            data.eval.save_to_disk(str(tmp / "eval"))
        meta = {"eval_conversations": data.eval_conversations, "stats": data.stats}
        (tmp / "meta.json").write_text(json.dumps(meta))


# -------------------------------------------------------------------------------------------------- build


def build_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read, mix, split, tokenize, apply the length policy; cached on disk keyed by everything that matters."""
    from jinja2.exceptions import TemplateError

    try:
        return build_tokenized(recipe, tokenizer)
    except TemplateError as exc:  # the template's own raise_exception, or a template that does not fit the rows
        whose = "the tokenizer's chat template" if recipe.data.chat_template in (None, "model") else \
            "data.chat_template"
        raise DataError(f"{recipe.source}: data.chat_template: {whose} failed on a row ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); fix the template, or set data.chat_template to one that renders these "
                        "rows (e.g. chatml)") from None


def build_tokenized(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    if recipe.method == "grpo":
        return build_prompt_datasets(recipe, tokenizer)
    key = cache_key(recipe, tokenizer) if recipe.data.cache else None
    if key and (cached := load_cached(key)) is not None:
        log.info("data: using the tokenized cache %s", data_cache_dir() / key)
        log_stats(cached.stats)
        return cached
    bad = BadRows() if recipe.data.on_bad_rows == "skip" else None
    rows = mix_sources(recipe, bad)
    train_rows, eval_rows = split_validation(rows, recipe)
    stats: dict[str, Any] = {}
    if bad is not None:
        stats["skipped_bad_rows"] = {"count": bad.count, "first_reasons": bad.reasons}
    train = tokenize_split(train_rows, tokenizer, recipe, "train", stats)
    evaluation = tokenize_split(eval_rows, tokenizer, recipe, "validation", stats) if eval_rows else None
    conversations = [r["messages"] for r in reference_rows(eval_rows) if "messages" in r]
    data = PreparedData(train, evaluation, conversations, stats)
    log_stats(stats)
    if key:
        store_cached(key, data)
    return data


def reference_conversation(row: Row) -> Conversation:
    """The conversation whose last turn generation metrics compare against: the row itself, or the prompt with its
    chosen (or desirable) answer."""
    if "messages" in row:
        return row["messages"]
    return row["prompt"] + row.get("chosen", row.get("completion"))


def reference_rows(rows: list[Row]) -> list[Row]:
    """Rows as SFT rows with reference answers (held-out loss and generation metrics): preference rows become the
    prompt with its chosen (or desirable) answer; undesirable unpaired rows have no reference and are left out."""
    return [row if "messages" in row or "text" in row else {"messages": reference_conversation(row)}
            for row in rows if "messages" in row or "text" in row or "chosen" in row or row.get("label") is True]


def tokenize_split(rows: list[Row], tokenizer: PreTrainedTokenizerBase, recipe: Recipe, split: str,
                   stats: dict) -> Dataset:
    if recipe.method in PREFERENCE_METHODS:
        return tokenize_preference_split(rows, tokenizer, recipe, split, stats)
    tokenized = [tokenize_row(tokenizer, row, recipe.data.loss_on) for row in rows]
    lengths = [len(t["input_ids"]) for t in tokenized]
    kept, policy = apply_length_policy(tokenized, recipe.training.max_length, recipe.data.overlong)
    check_rows_left(kept, lengths, recipe, split)
    stats[split] = {"rows": len(kept), "rows_read": len(rows), "tokens": sum(len(r["input_ids"]) for r in kept),
                    "trained_tokens": sum(sum(r["assistant_masks"]) for r in kept),
                    "lengths": sorted(lengths), **policy}
    return Dataset.from_list(kept)


def longest_training_row(data: PreparedData, recipe: Recipe) -> int | None:
    """Tokens in the longest sequence a training batch can hold: the longest tokenized row (a pair's prompt + its
    longer answer) capped at training.max_length, or max_length itself when every batch is padded to it
    (training.pad_to_max_length). None where trl packs rows to max_length or rows are not tokenized ahead (GRPO
    generates its completions)."""
    lengths = data.stats.get("train", {}).get("lengths")  # GRPO's are its prompts' alone
    if not lengths or recipe.method == "grpo" or (recipe.method == "sft" and recipe.training.packing):
        return None
    if recipe.method == "sft" and recipe.training.pad_to_max_length:
        return recipe.training.max_length  # every batch is padded to it
    return min(lengths[-1], recipe.training.max_length)


def varying_batch_lengths(data: PreparedData, recipe: Recipe) -> str | None:
    """Why training batches come in more than one sequence length (None: every batch has one shape). A kernel that
    builds a plan per shape (cuDNN's attention) pays that build again for every new length."""
    if recipe.method == "grpo":
        return "GRPO's prompts and completions vary in length"
    if recipe.method == "sft" and (recipe.training.packing or recipe.training.padding_free):
        return "rows run without padding: a batch is as long as the rows it holds"
    if recipe.method == "sft" and recipe.training.pad_to_max_length:
        return None  # every batch padded to max_length
    lengths = data.stats.get("train", {}).get("lengths")
    if not lengths:
        return None
    shortest, longest = (min(n, recipe.training.max_length) for n in (lengths[0], lengths[-1]))
    if shortest == longest:
        return None
    return f"rows of {shortest:,} to {longest:,} tokens, each batch padded to its longest"


def longest_packed_pair(data: PreparedData, recipe: Recipe) -> int | None:
    """Tokens in the longest pair as speed.shared_prefix packs it into one row: prompt + chosen + rejected (an upper
    bound of common prefix + both suffixes). None for the other methods."""
    lengths = data.stats.get("train", {}).get("pair_lengths")
    if not lengths or recipe.method not in PAIRED_METHODS:
        return None
    return lengths[-1]


def check_rows_left(kept: list, lengths: list[int], recipe: Recipe, split: str) -> None:
    if not kept:
        raise DataError(f"{recipe.source}: {split}: no rows left after applying training.max_length="
                        f"{recipe.training.max_length} (data.overlong={recipe.data.overlong}); "
                        f"the longest row has {max(lengths, default=0)} tokens. Raise max_length or shorten the "
                        "rows")


def tokenize_preference_split(rows: list[Row], tokenizer: PreTrainedTokenizerBase, recipe: Recipe, split: str,
                              stats: dict) -> Dataset:
    """Pairs (dpo, orpo, simpo) or unpaired rows (kto; pairs are split into a desirable and an undesirable row)."""
    longest = recipe.preference.max_prompt_length
    if recipe.method == "kto":
        rows = unpair(rows)
        tokenized = [tokenize_unpaired(tokenizer, r["prompt"], r["completion"], r["label"], longest) for r in rows]
    else:
        tokenized = [tokenize_pair(tokenizer, row, longest) for row in rows]
    answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if tokenized and c in tokenized[0]]
    lengths = [len(t["prompt_ids"]) + max(len(t[c]) for c in answers) for t in tokenized]
    kept, policy = apply_answer_length_policy(tokenized, recipe.training.max_length, recipe.data.overlong)
    check_rows_left(kept, lengths, recipe, split)
    trained = sum(len(r[c]) for r in kept for c in answers)
    stats[split] = {"rows": len(kept), "rows_read": len(rows), "trained_tokens": trained,
                    "tokens": trained + len(answers) * sum(len(r["prompt_ids"]) for r in kept),
                    "lengths": sorted(lengths), **policy,
                    **{f"{c.removesuffix('_ids')}_lengths": sorted(len(r[c]) for r in kept)
                       for c in ("prompt_ids", *answers)}}
    if recipe.method == "kto":
        stats[split]["desirable"] = sum(r["label"] for r in kept)
    else:  # the packed rows of speed.shared_prefix (longest_packed_pair)
        stats[split]["pair_lengths"] = sorted(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                              for r in kept)
    return Dataset.from_list(kept)


def log_stats(stats: dict) -> None:
    for split in ("train", "validation"):
        s = stats.get(split)
        if not s:
            continue
        kind = "pairs" if "chosen_lengths" in s else "rows"
        log.info("%s: %d %s, %d tokens (%d trained), longest %d", split, s["rows"], kind, s["tokens"],
                 s["trained_tokens"], s["lengths"][-1])
        if s["truncated"] or s["dropped_too_long"] or s["dropped_no_trained_tokens"]:
            log.warning("%s: training.max_length: %d rows truncated, %d dropped as too long, %d dropped with no "
                        "trained token left", split, s["truncated"], s["dropped_too_long"],
                        s["dropped_no_trained_tokens"])
    skipped = stats.get("skipped_bad_rows")
    if skipped and skipped["count"]:
        log.warning("data.on_bad_rows=skip: skipped %d bad rows; first: %s", skipped["count"],
                    "; ".join(skipped["first_reasons"]))


# ------------------------------------------------------------------------------------------- GRPO prompts


def prompt_turns(value: Any) -> Conversation:
    """A GRPO prompt: a string (one user turn) or a list of turns ending on a user turn (the model answers next)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError("the prompt is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"the prompt must be a string or a non-empty list of {{role, content}} turns, got "
                        f"{value!r:.80}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"prompt turn {i}: expected {{role, content}}, got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise DataError(f"prompt turn {i}: unknown role {turn['role']!r}; use one of {', '.join(ROLES)}")
        turns.append({"role": turn["role"], "content": turn_text(turn["content"], f"prompt turn {i} ({turn['role']})")})
    if turns[-1]["role"] != "user":
        raise DataError(f"the prompt ends on a {turns[-1]['role']} turn; it must end on a user turn, which the model "
                        "answers")
    return turns


def to_prompt_row(record: Any, source: DatasetSource, system_prompt: str | None, needed: dict[str, str]) -> Row:
    """One GRPO record -> {"prompt": turns, **its other columns}; the columns a reward reads must be there."""
    if not isinstance(record, dict):
        raise DataError(f"a row must be a JSON object, got {type(record).__name__}")
    prompt_column = source.fields.get("prompt", "prompt")
    turns = prompt_turns(field_of(record, "prompt", source))
    if system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": system_prompt}, *turns]
    for column, reward in needed.items():
        if column not in record:
            raise DataError(f"missing column '{column}', which reward {reward} reads; the row has columns "
                            f"{sorted(record)}")
    return {"prompt": turns, **{k: v for k, v in record.items() if k != prompt_column}}


def load_prompt_rows(source: DatasetSource, recipe: Recipe, bad: BadRows | None = None) -> list[Row]:
    """Every GRPO row of one source, each with its "file: line N" in the rewards' row column."""
    from qlora_kit.rewards import ROW_COLUMN, build_rewards, needed_columns

    needed = needed_columns(build_rewards(recipe))
    return rows_of(source, lambda where, record: {
        **to_prompt_row(record, source, recipe.data.system_prompt, needed), ROW_COLUMN: where}, bad)


def keep_prompts_that_fit(rows: list[Row], tokenizer: PreTrainedTokenizerBase, recipe: Recipe, split: str,
                          stats: dict) -> list[Row]:
    """Drop (and count) prompts over grpo.max_prompt_length tokens, rendered as generation will render them."""
    limit = recipe.grpo.max_prompt_length
    lengths = [len(tokenizer(render(tokenizer, row["prompt"], add_generation_prompt=True),
                             add_special_tokens=False).input_ids) for row in rows]
    kept = [row for row, n in zip(rows, lengths, strict=True) if limit is None or n <= limit]
    if not kept:
        raise DataError(f"{recipe.source}: {split}: every prompt is longer than grpo.max_prompt_length={limit} "
                        f"tokens (the shortest has {min(lengths)}); raise it")
    stats[split] = {"rows": len(kept), "rows_read": len(rows), "tokens": sum(n for n in lengths if limit is None
                                                                             or n <= limit),
                    "trained_tokens": 0, "lengths": sorted(lengths), "truncated": 0,
                    "dropped_too_long": len(rows) - len(kept), "dropped_no_trained_tokens": 0}
    return kept


def prompt_dataset(rows: list[Row]) -> Dataset:
    try:
        return Dataset.from_list(rows)
    except (TypeError, ValueError) as exc:  # pyarrow: a column whose type differs between rows
        mixed = next((f"column {key!r} holds {' and '.join(sorted(types))} values"
                      for key in rows[0] if len(types := {type(row.get(key)).__name__ for row in rows
                                                          if row.get(key) is not None}) > 1), str(exc)[:200])
        raise DataError(f"the GRPO rows cannot form one table: {mixed}. Give each column the same type in every "
                        "row (e.g. a reference always as a string)") from None


def split_prompt_rows(recipe: Recipe, bad: BadRows | None) -> tuple[list[Row], list[Row]]:
    """GRPO's prompt rows, mixed by weight as mix_sources mixes SFT rows, and split from the held-out ones."""
    rng = random.Random(recipe.data.seed)
    rows: list[Row] = []
    for source in recipe.data.datasets:
        rows += weighted(load_prompt_rows(source, recipe, bad), source, rng)
    if isinstance(recipe.data.validation, str):
        return rows, load_prompt_rows(DatasetSource(path=recipe.data.validation), recipe)
    return split_validation(rows, recipe)


def build_prompt_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """GRPO data: prompts as conversations (the chat template is applied at generation, as SFT renders its prompts)
    plus the columns the rewards read; mixed, split and length-checked like SFT rows, never tokenized or cached."""
    bad = BadRows() if recipe.data.on_bad_rows == "skip" else None
    train_rows, eval_rows = split_prompt_rows(recipe, bad)
    stats: dict[str, Any] = {}
    if bad is not None:
        stats["skipped_bad_rows"] = {"count": bad.count, "first_reasons": bad.reasons}
    train_rows = keep_prompts_that_fit(train_rows, tokenizer, recipe, "train", stats)
    if eval_rows:
        eval_rows = keep_prompts_that_fit(eval_rows, tokenizer, recipe, "validation", stats)
    log_stats(stats)
    return PreparedData(prompt_dataset(train_rows), None, [], stats, eval_rows)


def training_rows(recipe: Recipe) -> int:
    """How many rows training reads, as training gets them: every source read and checked, mixed by weight, split
    from the held-out rows (a held-out file read and checked too); no tokenizer needed. So `validate` refuses what
    `train` would refuse before its first row: a held-out share that leaves nothing to train on, a bad held-out file."""
    bad = BadRows() if recipe.data.on_bad_rows == "skip" else None
    if recipe.method == "grpo":
        return len(split_prompt_rows(recipe, bad)[0])
    return len(split_validation(mix_sources(recipe, bad), recipe)[0])


# ------------------------------------------------------------------------------------------------ dry run


def percentile(sorted_values: list[int], fraction: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def length_histogram(lengths: list[int], bins: int = 8, width: int = 40) -> list[str]:
    low, high = lengths[0], lengths[-1]
    step = max(1, -(-(high - low + 1) // bins))
    bins = -(-(high - low + 1) // step)
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // step)] += 1
    top = max(counts)
    return [f"  {low + i * step:>7}-{low + (i + 1) * step - 1:<7} {'#' * round(width * c / top):<{width}} {c}"
            for i, c in enumerate(counts)]


def highlight_trained(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], mask: list[int], color: bool) -> str:
    """The example as text with the trained tokens marked, so a user sees exactly what the loss covers."""
    start, end = ("\033[42m\033[30m", "\033[0m") if color else ("⟦", "⟧")
    pieces, current, trained = [], [], None
    for token, bit in zip(input_ids, mask, strict=True):
        if trained is not None and bit != trained:
            pieces.append((trained, tokenizer.decode(current)))
            current = []
        current.append(token)
        trained = bit
    if current:
        pieces.append((trained, tokenizer.decode(current)))
    return "".join(f"{start}{text}{end}" if bit else text for bit, text in pieces)


def describe_data(data: PreparedData, tokenizer: PreTrainedTokenizerBase, recipe: Recipe, color: bool) -> str:
    """The `qlora-kit data` report: rows, length percentiles and histogram, policy counts, one masked example."""
    lines = []
    for split in ("train", "validation"):
        s = data.stats.get(split)
        if not s:
            continue
        lengths = s["lengths"]
        if recipe.method == "grpo":
            lines.append(f"{split}: {s['rows']} prompts (of {s['rows_read']} read), {s['tokens']:,} prompt tokens")
        else:
            lines.append(f"{split}: {s['rows']} rows (of {s['rows_read']} read), {s['tokens']:,} tokens, "
                         f"{s['trained_tokens']:,} trained")
        limit = f"grpo.max_prompt_length {recipe.grpo.max_prompt_length}" if recipe.method == "grpo" else \
            f"max_length {recipe.training.max_length}"
        lines.append(f"  length p50 {percentile(lengths, .5)}, p90 {percentile(lengths, .9)}, "
                     f"p99 {percentile(lengths, .99)}, max {lengths[-1]} ({limit})")
        lines.append(f"  truncated {s['truncated']}, dropped as too long {s['dropped_too_long']}, dropped with no "
                     f"trained token {s['dropped_no_trained_tokens']}")
        lines += length_histogram(lengths)
    skipped = data.stats.get("skipped_bad_rows")
    if skipped:
        lines.append(f"bad rows skipped: {skipped['count']}" + "".join(f"\n  {r}" for r in skipped["first_reasons"]))
    train = data.stats["train"]
    per_step = recipe.training.batch_size * recipe.training.gradient_accumulation_steps
    if recipe.method == "grpo":
        g = recipe.grpo
        prompts = per_step // g.num_generations
        lines.append(f"GRPO: {prompts} prompts x {g.num_generations} completions (up to {g.max_completion_length} "
                     f"tokens each) per optimizer step, generated in one batch; {-(-train['rows'] // prompts)} "
                     "optimizer steps per epoch (one process)")
        lines.append("example 0 (the prompt as generation sees it):")
        lines.append(render(tokenizer, data.train[0]["prompt"], add_generation_prompt=True))
        return "\n".join(lines)
    lines.append(f"tokens per epoch: {train['tokens']:,}; optimizer steps per epoch (one process): "
                 f"{-(-train['rows'] // per_step) if not recipe.training.packing else 'fewer (packed)'}")
    if recipe.method in PREFERENCE_METHODS:
        lines += describe_preference_rows(data, tokenizer, color)
        return "\n".join(lines)
    first = data.train[0]
    lines.append("example 0 (trained tokens " + ("highlighted" if color else "inside ⟦ ⟧") + "):")
    lines.append(highlight_trained(tokenizer, first["input_ids"], first["assistant_masks"], color))
    return "\n".join(lines)


def describe_preference_rows(data: PreparedData, tokenizer: PreTrainedTokenizerBase, color: bool) -> list[str]:
    """Prompt and answer lengths per split, and the first row with the tokens the loss scores marked."""
    lines = []
    for split in ("train", "validation"):
        s = data.stats.get(split)
        if not s:
            continue
        parts = [f"{name} p50 {percentile(s[key], .5)}, max {s[key][-1]}" for name, key in (
            ("prompt", "prompt_lengths"), ("chosen", "chosen_lengths"), ("rejected", "rejected_lengths"),
            ("completion", "completion_lengths")) if s.get(key)]
        lines.append(f"{split} {'rows' if 'desirable' in s else 'pairs'}: {s['rows']}; tokens " + "; ".join(parts))
        if "desirable" in s:
            lines.append(f"  desirable {s['desirable']}, undesirable {s['rows'] - s['desirable']}")
    first = data.train[0]
    marked = "highlighted" if color else "inside ⟦ ⟧"
    answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in first]
    for column in answers:
        name = column.removesuffix("_ids")
        if name == "completion":
            name += " (desirable)" if first["label"] else " (undesirable)"
        lines.append(f"example 0, prompt + {name} (scored tokens {marked}):")
        ids = first["prompt_ids"] + first[column]
        lines.append(highlight_trained(tokenizer, ids, [0] * len(first["prompt_ids"]) + [1] * len(first[column]),
                                       color))
    return lines
