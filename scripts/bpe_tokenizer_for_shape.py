"""Give a random-weight model folder (bench.py's token-per-byte tokenizer) a trained byte-level BPE tokenizer with
ChatML, so the GGUF exporter, which writes BPE vocabularies only, can export it:
`python scripts/bpe_tokenizer_for_shape.py FOLDER`. Used for the 8B GGUF export measurement on the GPU machine; the
weights do not depend on the tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def main(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Write one sentence about the sea. What is 12 plus 30? Translate 'good morning' into French.",
            "The quick brown fox jumps over the lazy dog while the sea is calm and the morning is good."] * 50
    core.train_from_iterator(text, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / stale).unlink(missing_ok=True)
    tokenizer.save_pretrained(folder)
    for name in ("config.json", "generation_config.json"):  # the special ids must be the new tokenizer's
        config = json.loads((folder / name).read_text())
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        (folder / name).write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
