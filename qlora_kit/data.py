"""Load dataset files, normalise rows to chat conversations, tokenize with exact loss masks, split off validation.

Masks are computed here rather than by the chat template's `{% generation %}` markers, which most templates
(SmolLM2's, Llama 3's, Mistral's) do not have: each assistant turn's character span is found by rendering the
conversation up to that turn, and the tokens inside those spans are the ones trained on.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from qlora_kit.recipe import DatasetSource, QloraKitError, Recipe

log = logging.getLogger("qlora_kit")

ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, str]]


class DataError(QloraKitError):
    """A dataset row or file that cannot be trained on; the message names the file and line."""


@dataclass
class PreparedData:
    """Tokenized splits for the trainer, plus the held-out conversations for generation metrics."""

    train: Dataset
    eval: Dataset | None
    eval_conversations: list[Conversation]


# --------------------------------------------------------------------------------------------------- reading


def read_records(path: str) -> list[tuple[int, Any]]:
    """(line number, record) pairs from a .jsonl file or a .json list; a malformed line is an error naming it."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: a .json dataset must be a list of rows, got {type(records).__name__}")
        return [(i + 1, r) for i, r in enumerate(records)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
    return rows


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict) and "messages" in record:
        return "messages"
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        return "prompt_completion"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: cannot tell the row format from its fields {keys}; expected `messages` or "
                    "`prompt` + `completion` (or set the dataset's `format`)")


def to_conversation(record: Any, fmt: str, where: str, system_prompt: str | None) -> Conversation:
    """One row as a checked list of {role, content} turns ending on an assistant turn."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    if fmt == "messages":
        messages = require(record, "messages", where)
    else:
        prompt, completion = require(record, "prompt", where), require(record, "completion", where)
        messages = as_turns(prompt, "user", where) + as_turns(completion, "assistant", where)
    messages = check_turns(messages, where)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def require(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'; the row has {sorted(record)}")
    return record[key]


def as_turns(value: Any, role: str, where: str) -> Conversation:
    """A plain-text prompt/completion becomes one turn; a conversational one is already a list of turns."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: {role} side must be a string or a list of turns, got {type(value).__name__}")


def check_turns(messages: Any, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} turns, got {messages!r:.80}")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: turn {i}: expected {{role, content}}, got {turn!r:.80}")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: turn {i}: unknown role {turn['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            raise DataError(f"{where}: turn {i} ({turn['role']}): content is empty or not a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends on a {turns[-1]['role']} turn; it must end on an "
                        "assistant turn, which is what the model learns to write")
    return turns


def load_conversations(source: DatasetSource, system_prompt: str | None) -> list[Conversation]:
    records = read_records(source.path)
    if not records:
        raise DataError(f"{source.path}: the file has no rows")
    fmt = source.format
    if fmt == "auto":
        fmt = detect_format(records[0][1], f"{source.path}: line {records[0][0]}")
    return [to_conversation(r, fmt, f"{source.path}: line {n}", system_prompt) for n, r in records]


# ------------------------------------------------------------------------------------------------ tokenizing


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (content + end-of-turn tokens)."""
    full = render(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end_text = render(tokenizer, messages[: i + 1])
        if not full.startswith(end_text) or start > len(end_text):
            raise DataError("the chat template does not render conversations incrementally (turn "
                            f"{i} renders differently inside the full conversation), so assistant turns cannot be "
                            "located; set data.loss_on: all, or use a template without history rewriting")
        spans.append((start, len(end_text)))
    return full, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Conversation, loss_on: str) -> dict:
    """input_ids plus `assistant_masks` (1 = trained on), the column trl's SFTTrainer turns into labels."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if loss_on == "all":
        mask = [1] * len(encoded.input_ids)
    else:
        mask = [int(any(s <= start and end <= e for s, e in spans) and end > start)
                for start, end in encoded.offset_mapping]
    return {"input_ids": encoded.input_ids, "assistant_masks": mask}


# ------------------------------------------------------------------------------------------------ splitting


def split_validation(conversations: list[Conversation], recipe: Recipe) -> tuple[list, list]:
    d = recipe.data
    if d.validation is None:
        return conversations, []
    if isinstance(d.validation, str):
        held_out = load_conversations(DatasetSource(path=d.validation, format="auto"), d.system_prompt)
        return conversations, held_out
    order = list(range(len(conversations)))
    random.Random(d.seed).shuffle(order)
    count = d.validation if isinstance(d.validation, int) else max(1, round(d.validation * len(conversations)))
    if count >= len(conversations):
        raise DataError(f"{recipe.source}: data.validation: {d.validation} leaves no training rows out of "
                        f"{len(conversations)}")
    held = set(order[:count])
    return [c for i, c in enumerate(conversations) if i not in held], [conversations[i] for i in sorted(held)]


def build_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Read every training file, split, tokenize; logs row counts and how many rows max_length truncates."""
    conversations = [c for source in recipe.data.datasets
                     for c in load_conversations(source, recipe.data.system_prompt)]
    train_rows, eval_rows = split_validation(conversations, recipe)
    train = tokenize_rows(train_rows, tokenizer, recipe, "train")
    evaluation = tokenize_rows(eval_rows, tokenizer, recipe, "validation") if eval_rows else None
    return PreparedData(train=train, eval=evaluation, eval_conversations=eval_rows)


def tokenize_rows(rows: list[Conversation], tokenizer: PreTrainedTokenizerBase, recipe: Recipe, split: str) -> Dataset:
    tokenized = [tokenize_conversation(tokenizer, messages, recipe.data.loss_on) for messages in rows]
    lengths = [len(t["input_ids"]) for t in tokenized]
    too_long = sum(n > recipe.training.max_length for n in lengths)
    log.info("%s: %d rows, %d tokens, longest %d", split, len(rows), sum(lengths), max(lengths))
    if too_long:
        log.warning("%s: %d of %d rows are longer than training.max_length=%d and will be truncated", split,
                    too_long, len(rows), recipe.training.max_length)
    return Dataset.from_list(tokenized)
