"""Generation metrics on held-out conversations: the model answers each prompt, compared with the reference turn."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from qlora_kit.data import Conversation, render
from qlora_kit.recipe import EvaluationSection

log = logging.getLogger("qlora_kit")


@dataclass
class GenerationScore:
    metric: str
    score: float
    rows: int
    examples: list[dict[str, str]] = field(default_factory=list)


@torch.no_grad()
def generate_answers(model, tokenizer: PreTrainedTokenizerBase, prompts: list[Conversation], max_new_tokens: int,
                     batch_size: int, stop_ids: list[int]) -> list[str]:
    """Greedy answers, left-padded batches, stopping on any end-of-turn id (so trained models stop on their own)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts[start: start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id)
            new_tokens = out[:, batch["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def matches(answer: str, reference: str, metric: str) -> bool:
    if metric == "exact_match":
        return answer.strip() == reference.strip()
    if metric == "contains":
        return reference.strip() in answer
    raise ValueError(metric)


def evaluate_generation(model, tokenizer: PreTrainedTokenizerBase, conversations: list[Conversation],
                        section: EvaluationSection, stop_ids: list[int]) -> GenerationScore:
    rows = conversations[: section.max_samples]
    prompts = [c[:-1] for c in rows]
    references = [c[-1]["content"] for c in rows]
    answers = generate_answers(model, tokenizer, prompts, section.max_new_tokens, section.batch_size, stop_ids)
    hits = [matches(a, r, section.metric) for a, r in zip(answers, references, strict=False)]
    examples = [{"prompt": p[-1]["content"], "reference": r, "answer": a}
                for p, r, a in zip(prompts[:3], references[:3], answers[:3], strict=False)]
    return GenerationScore(section.metric, sum(hits) / len(hits), len(hits), examples)


def format_comparison(before: GenerationScore, after: GenerationScore) -> str:
    lines = [f"{before.metric} on {before.rows} held-out rows: before {before.score:.1%} -> after {after.score:.1%}"]
    for example in after.examples[:2]:
        lines.append("  example: " + json.dumps(example, ensure_ascii=False))
    return "\n".join(lines)
