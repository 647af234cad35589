"""GRPO rewards named in the recipe: built-ins that need no code, and user functions (`module:function` or
`path/to/file.py:function`), each wrapped so that a reward that raises or returns something unusable stops training
with the function and the dataset row named.

A reward has trl's GRPOTrainer signature: `(prompts, completions, **columns) -> list[float]`, one value per
completion. `columns` holds every dataset column of the batch (a list per column, aligned with `completions`), plus
trl's `completion_ids`, `trainer_state`, `log_extra` and `log_metric`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.recipe import QloraKitError, Recipe, RecipeError, RewardSpec

# The dataset column holding each row's "file: line N"; dropped before a reward sees the columns.
ROW_COLUMN = "_qlora_kit_row"
# Keyword arguments trl passes to every reward besides the dataset columns (trl 1.16 `_calculate_rewards`).
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric",
                 "environments")


def completion_text(completion: Any) -> str:
    """A completion as text: trl passes strings for plain prompts and [{role, content}] for conversational ones."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return str(completion)


def parse_json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text.strip())
    except ValueError:
        return False, None


def reference_value(value: Any) -> Any:
    """A json_equal reference: a JSON string is parsed, anything else (a dataset column holding an object) is taken
    as it is."""
    if isinstance(value, str):
        ok, parsed = parse_json(value)
        return parsed if ok else value
    return value


# ------------------------------------------------------------------------------------------------ built-ins


def json_valid(completions: list, keys: list[str] | None = None, **_: Any) -> list[float]:
    """1 for a completion that parses as JSON; with `keys`, a JSON object scores the fraction of `keys` it has
    (1 with all of them) and anything else 0."""
    scores = []
    for completion in completions:
        ok, value = parse_json(completion_text(completion))
        if not ok:
            scores.append(0.0)
        elif keys:
            scores.append(sum(k in value for k in keys) / len(keys) if isinstance(value, dict) else 0.0)
        else:
            scores.append(1.0)
    return scores


def json_equal(completions: list, references: list, **_: Any) -> list[float]:
    """1 where the completion parses as JSON equal to the reference (key order and spacing ignored), else 0."""
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        ok, value = parse_json(completion_text(completion))
        scores.append(float(ok and value == reference_value(reference)))
    return scores


def exact_match(completions: list, references: list, **_: Any) -> list[float]:
    """1 where the completion is the reference text (outer whitespace ignored), else 0."""
    return [float(completion_text(c).strip() == str(r).strip()) for c, r in zip(completions, references, strict=True)]


def regex_match(completions: list, pattern: re.Pattern, **_: Any) -> list[float]:
    """1 where `pattern` is found in the completion (re.search), else 0."""
    return [float(pattern.search(completion_text(c)) is not None) for c in completions]


def length_penalty(completions: list, completion_ids: list, target: int, limit: int, unit: str,
                   **_: Any) -> list[float]:
    """0 up to `target` characters (or tokens), falling linearly to -1 at `limit`, -1 beyond."""
    scores = []
    for completion, ids in zip(completions, completion_ids, strict=True):
        size = len(ids) if unit == "tokens" else len(completion_text(completion))
        scores.append(-min(1.0, max(0, size - target) / (limit - target)))
    return scores


@dataclass(frozen=True)
class Builtin:
    """A built-in reward: the settings it needs, the settings it may take, and whether it reads a dataset column."""

    function: Callable[..., list[float]]
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    summary: str = ""


BUILTINS = {
    "json_valid": Builtin(json_valid, optional=("keys",),
                          summary="1 for valid JSON; with keys, the fraction of keys the JSON object has"),
    "json_equal": Builtin(json_equal, required=("column",),
                          summary="1 where the completion parses as JSON equal to the reference column"),
    "exact_match": Builtin(exact_match, required=("column",),
                           summary="1 where the completion is the reference column's text"),
    "regex": Builtin(regex_match, required=("pattern",), summary="1 where the pattern is found in the completion"),
    "length": Builtin(length_penalty, required=("max",), optional=("target", "unit"),
                      summary="0 up to target chars/tokens, down to -1 at max"),
}
# RewardSpec fields that configure a built-in (everything but name, function, weight).
SETTINGS = ("column", "pattern", "keys", "target", "max", "unit")


# ------------------------------------------------------------------------------------------- the wrapper


class RewardFunction:
    """One recipe reward as trl calls it, checking what comes back.

    A reward that raises is called again row by row to find the row it fails on; a result that is not one finite
    number per completion stops training. Either way one QloraKitError names the reward and the dataset row.
    """

    def __init__(self, name: str, label: str, function: Callable[..., Any], settings: dict[str, Any],
                 columns: tuple[str, ...], weight: float) -> None:
        self.__name__ = name  # trl logs rewards/<__name__>/mean
        self.label, self.function, self.settings, self.columns, self.weight = label, function, settings, columns, weight

    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        rows = columns.pop(ROW_COLUMN, None) or [None] * len(completions)
        try:
            values = self.call(prompts, completions, columns)
        except QloraKitError:
            raise
        except Exception as exc:  # the user's code: any exception is a user error to report with its row
            index, exc = self.failing_row(prompts, completions, columns, exc)
            where = f"on {self.describe_row(rows, index, completions)}" if index is not None else \
                f"on a batch of {len(completions)} completions ({self.row_range(rows)})"
            raise QloraKitError(f"reward {self.label} raised {type(exc).__name__}: {exc} {where}") from exc
        return self.check(values, prompts, completions, rows)

    def call(self, prompts: list, completions: list, columns: dict[str, Any]) -> Any:
        return self.function(prompts=prompts, completions=completions, **columns, **self.settings)

    def failing_row(self, prompts: list, completions: list, columns: dict[str, Any],
                    error: Exception) -> tuple[int | None, Exception]:
        """The first row the reward raises on when called with that row alone (None if only the batch fails)."""
        size = len(completions)
        for i in range(size):
            one = {k: v[i:i + 1] if isinstance(v, list) and len(v) == size else v for k, v in columns.items()}
            try:
                self.call(prompts[i:i + 1], completions[i:i + 1], one)
            except Exception as exc:
                return i, exc
        return None, error

    def check(self, values: Any, prompts: list, completions: list, rows: list) -> list[float]:
        if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy array or torch tensor
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise QloraKitError(f"reward {self.label} returned {got} for {len(completions)} completions "
                                f"({self.row_range(rows)}); a reward returns a list with one number per completion")
        out = []
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise QloraKitError(f"reward {self.label} returned {value!r} for "
                                    f"{self.describe_row(rows, i, completions)}; every reward must be a finite number")
            out.append(float(value))
        return out

    @staticmethod
    def describe_row(rows: list, index: int, completions: list) -> str:
        where = rows[index] or f"completion {index} of the batch"
        return f"{where} (completion {completion_text(completions[index])[:120]!r})"

    @staticmethod
    def row_range(rows: list) -> str:
        known = sorted({r for r in rows if r})
        return ", ".join(known[:3]) + (f" and {len(known) - 3} more rows" if len(known) > 3 else "") if known \
            else "rows unknown"


class ColumnReward(RewardFunction):
    """A built-in that compares with a dataset column: that column is passed as `references`."""

    def call(self, prompts: list, completions: list, columns: dict[str, Any]) -> Any:
        settings = {k: v for k, v in self.settings.items() if k != "column"}
        return self.function(completions=completions, references=columns[self.settings["column"]], **settings)


# --------------------------------------------------------------------------------------------- resolving


def build_rewards(recipe: Recipe) -> list[RewardFunction]:
    """The recipe's `grpo.rewards` as checked callables; every mistake is a RecipeError before weights load."""
    rewards, names = [], set()
    for i, spec in enumerate(recipe.grpo.rewards):
        key = f"grpo.rewards[{i}]"
        reward = builtin_reward(recipe.source, key, spec) if spec.name is not None else \
            user_reward(recipe.source, key, spec)
        base, n = reward.__name__, 2
        while reward.__name__ in names:  # two regex rewards log as regex and regex_2
            reward.__name__, n = f"{base}_{n}", n + 1
        names.add(reward.__name__)
        rewards.append(reward)
    if not rewards:
        raise RecipeError(f"{recipe.source}: grpo.rewards: GRPO needs at least one reward, e.g. "
                          "`rewards: [{name: json_valid}]`")
    return rewards


def builtin_reward(source: str, key: str, spec: RewardSpec) -> RewardFunction:
    if spec.function is not None:
        raise RecipeError(f"{source}: {key}: give `name` (a built-in) or `function` (your code), not both")
    builtin = BUILTINS.get(spec.name)
    if builtin is None:
        close = difflib.get_close_matches(spec.name, list(BUILTINS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"{source}: {key}.name: unknown built-in reward {spec.name!r}{hint}; built-ins: "
                          f"{', '.join(BUILTINS)}, or use `function: module:function` for your own")
    given = {s: getattr(spec, s) for s in SETTINGS if getattr(spec, s) is not None}
    takes = builtin.required + builtin.optional
    for setting in given:
        if setting not in takes:
            accepted = ", ".join(takes) if takes else "no settings"
            raise RecipeError(f"{source}: {key}.{setting}: not a setting of the {spec.name} reward (it takes "
                              f"{accepted})")
    for setting in builtin.required:
        if setting not in given:
            raise RecipeError(f"{source}: {key}: the {spec.name} reward needs `{setting}` ({builtin.summary})")
    if spec.name == "regex":
        try:
            given["pattern"] = re.compile(spec.pattern)
        except re.error as exc:
            raise RecipeError(f"{source}: {key}.pattern: not a valid regular expression: {exc}") from None
    if spec.name == "length":
        given.setdefault("target", 0)
        given.setdefault("unit", "chars")
        given["limit"] = given.pop("max")
        if given["limit"] <= given["target"]:
            raise RecipeError(f"{source}: {key}: length needs max > target (got target {given['target']}, max "
                              f"{given['limit']})")
    if spec.name in ("json_equal", "exact_match"):
        return ColumnReward(spec.name, spec.name, builtin.function, given, (spec.column,), spec.weight)
    return RewardFunction(spec.name, spec.name, builtin.function, given, (), spec.weight)


def user_reward(source: str, key: str, spec: RewardSpec) -> RewardFunction:
    if spec.function is None:
        raise RecipeError(f"{source}: {key}: give `name` (a built-in: {', '.join(BUILTINS)}) or `function` "
                          "(module:function or path/to/file.py:function)")
    for setting in SETTINGS:
        if getattr(spec, setting) is not None:
            raise RecipeError(f"{source}: {key}.{setting}: settings are for built-in rewards; a user function reads "
                              "dataset columns as keyword arguments")
    function = load_function(source, f"{key}.function", spec.function)
    columns = required_columns(source, f"{key}.function", spec.function, function)
    return RewardFunction(getattr(function, "__name__", "reward"), spec.function, function, {}, columns, spec.weight)


def load_function(source: str, key: str, target: str) -> Callable[..., Any]:
    """`module:function` (importable) or `path/to/file.py:function` (relative to the recipe file's folder)."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise RecipeError(f"{source}: {key}: {target!r} is not module:function or path/to/file.py:function")
    if where.endswith(".py"):
        path = Path(where) if Path(where).is_absolute() else Path(source).resolve().parent / where
        if not path.is_file():
            raise RecipeError(f"{source}: {key}: file not found: {path} (a relative path is read from the recipe "
                              "file's folder)")
        module_name = f"qlora_kit_reward_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise RecipeError(f"{source}: {key}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # `qlora-kit` runs as a script: the current folder's modules count too
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise RecipeError(f"{source}: {key}: no module named {exc.name!r} (for a file, write "
                              "path/to/file.py:function)") from None
        except Exception as exc:
            raise RecipeError(f"{source}: {key}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if function is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"{source}: {key}: {where} has no function {name!r}{hint}")
    if not callable(function):
        raise RecipeError(f"{source}: {key}: {where}:{name} is a {type(function).__name__}, not a function")
    return function


def required_columns(source: str, key: str, target: str, function: Callable[..., Any]) -> tuple[str, ...]:
    """The dataset columns a user reward names as parameters without defaults; it must take `completions` and
    accept trl's other arguments through **kwargs."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return ()
    names = {p.name for p in parameters}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        raise RecipeError(f"{source}: {key}: {target} must accept **kwargs: trl passes every dataset column and "
                          "its own arguments (completion_ids, trainer_state, ...) by keyword; write "
                          "`def reward(prompts, completions, **kwargs)`")
    if "completions" not in names:
        raise RecipeError(f"{source}: {key}: {target} has no `completions` parameter; write "
                          "`def reward(prompts, completions, **kwargs)` returning one number per completion")
    return tuple(p.name for p in parameters if p.name not in TRL_ARGUMENTS and p.default is inspect.Parameter.empty
                 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def needed_columns(rewards: Sequence[RewardFunction]) -> dict[str, str]:
    """Dataset column -> the reward that reads it."""
    return {column: reward.label for reward in rewards for column in reward.columns}


def weighted_total(rewards: Sequence[RewardFunction], per_reward: list[list[float]]) -> list[float]:
    """The reward GRPO optimises (trl's default aggregation: the weighted sum)."""
    return [sum(r.weight * values[i] for r, values in zip(rewards, per_reward, strict=True))
            for i in range(len(per_reward[0]))]
