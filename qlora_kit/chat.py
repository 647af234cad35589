"""`qlora-kit chat`: talk to a trained run, one-shot or interactively, streaming tokens as they are generated.

The chat template, system prompt and end-of-turn tokens are the ones training used (from the adapter folder and the
run's recipe), so what you see is what the model learned, on CPU or GPU.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import torch
from transformers import TextStreamer

from qlora_kit.data import Conversation, render
from qlora_kit.evaluate import TrainedModel


class EchoStreamer(TextStreamer):
    """Writes each decoded piece to `out` as soon as it is final, and keeps the whole reply."""

    def __init__(self, tokenizer, out: TextIO | None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pieces.append(text)
        if self.out is not None:
            self.out.write(text + ("\n" if stream_end else ""))
            self.out.flush()


@dataclass
class ChatReply:
    text: str
    new_tokens: int
    stopped: bool  # True: ended on an end-of-turn token; False: ran into max_new_tokens


@torch.no_grad()
def reply(trained: TrainedModel, messages: Conversation, max_new_tokens: int = 256, temperature: float | None = None,
          out: TextIO | None = None) -> ChatReply:
    """Generate the assistant's next turn for `messages`, streaming it to `out`.

    temperature None follows the run's generation config (sampling if the base model's config samples), 0 is
    greedy, > 0 samples at that temperature.
    """
    tokenizer, model = trained.tokenizer, trained.model
    text = render(tokenizer, messages, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    config = copy.deepcopy(trained.generation_config)
    config.update(max_new_tokens=max_new_tokens, eos_token_id=trained.stop_ids, pad_token_id=tokenizer.pad_token_id)
    if temperature == 0:
        config.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    elif temperature is not None:
        config.update(do_sample=True, temperature=temperature)
    streamer = EchoStreamer(tokenizer, out)
    output = model.generate(**inputs, generation_config=config, streamer=streamer)
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    stopped = bool(new) and new[-1] in trained.stop_ids
    return ChatReply(tokenizer.decode(new, skip_special_tokens=True).strip(), len(new), stopped)


def start_conversation(trained: TrainedModel, system: str | None) -> Conversation:
    """The system prompt training added to rows without one, unless `system` overrides it ("" for none)."""
    prompt = trained.recipe.data.system_prompt if system is None else system
    return [{"role": "system", "content": prompt}] if prompt else []


def chat_once(trained: TrainedModel, prompt: str, system: str | None = None, max_new_tokens: int = 256,
              temperature: float | None = None, out: TextIO | None = None) -> ChatReply:
    messages = [*start_conversation(trained, system), {"role": "user", "content": prompt}]
    return reply(trained, messages, max_new_tokens, temperature, out)


def chat_loop(trained: TrainedModel, system: str | None = None, max_new_tokens: int = 256,
              temperature: float | None = None, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """Interactive chat keeping the history; /reset clears it, /exit (or Ctrl-D) quits."""
    what = "merged model" if trained.merged else "adapter"
    out.write(f"chatting with {trained.run_dir} ({what}; /reset clears the history, /exit or Ctrl-D quits)\n")
    history = start_conversation(trained, system)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history = start_conversation(trained, system)
            out.write("(history cleared)\n")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        out.write("assistant> ")
        answer = reply(trained, history, max_new_tokens, temperature, out)
        if not answer.stopped:
            out.write(f"(stopped at max_new_tokens={max_new_tokens})\n")
        history.append({"role": "assistant", "content": answer.text})
