"""A user reward for recipes/quickstart-grpo.yaml: partial credit per field, so a completion that gets three of the
four fields right scores above one that gets none (a smoother signal than all-or-nothing json_equal).

Any reward has trl's signature: (prompts, completions, **columns) -> one number per completion; a parameter named
after a dataset column (`answer` here) receives that column, and every row must have it.
"""

from __future__ import annotations

import json


def field_accuracy(prompts: list, completions: list, answer: list[str], **kwargs) -> list[float]:
    """The fraction of the reference's fields the completion's JSON has with the same value (0 if it is not JSON)."""
    scores = []
    for completion, reference in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        expected = json.loads(reference)
        try:
            got = json.loads(text.strip())
        except ValueError:
            scores.append(0.0)
            continue
        if not isinstance(got, dict):
            scores.append(0.0)
            continue
        scores.append(sum(got.get(key) == value for key, value in expected.items()) / len(expected))
    return scores
