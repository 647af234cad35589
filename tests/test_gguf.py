"""GGUF, LoRA GGUF and Ollama exports (qlora_kit/gguf.py): each architecture family round-trips through transformers'
GGUF reader, the tokenizer metadata is llama.cpp's, the Modelfile TEMPLATE renders the chat template's prompt, and a
broken export fails its check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from qlora_kit import gguf as export
from qlora_kit.recipe import QloraKitError, RecipeError, load_recipe
from qlora_kit.rundir import FOLDER_MANIFEST

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    # llama.cpp scales Gemma's attention by 1/sqrt(head_dim): the tiny model must use the same query scalar.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {}),
    # rope variants written as llama.cpp tensors: Llama 3.1's rope_freqs, Phi-4-mini's long/short factors
    "llama3.1-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                      {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 64}}),
    "phi4-mini-rope": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                       {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 128,
                        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                            "long_factor": [1.0 + i / 6 for i in range(6)], "short_factor": [1.0] * 6,
                                            "original_max_position_embeddings": 128}}),
}
ROPE_TENSORS = {"llama3.1-rope": {"rope_freqs.weight"},
                "phi4-mini-rope": {"rope_factors_long.weight", "rope_factors_short.weight"}}


def tiny_model_folder(folder: Path, family: str, tokenizer_dir: Path) -> Path:
    """A 2-layer, hidden-64 random model of `family` saved with the tiny tokenizer, norms moved off their init value
    (so a missing Gemma +1 or a dropped norm shows in the logits)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: tiny_model_folder(root / family, family, tiny_model_dir) for family in FAMILIES}


# ------------------------------------------------------------------------------------------- model round trip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_read_back_computes_the_logits_and_greedy_tokens_of_the_model(family, family_folders, tmp_path):
    check = export.write_and_check(family_folders[family], tmp_path / "model.gguf", "f32")

    assert check.passed
    assert check.max_abs_logit_diff_vs_rounded <= check.tolerance
    assert check.max_abs_logit_diff_vs_merged <= check.tolerance  # f32 stores the weights unrounded
    assert check.top1_agreement_vs_merged == 1.0
    assert check.greedy_tokens_equal and check.greedy_gguf == check.greedy_merged
    assert check.config_mismatches == []
    assert check.architecture == export.ARCHITECTURES[FAMILIES[family][1].__name__].name.lower()
    names = {t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert {n for n in names if n.startswith("rope")} == ROPE_TENSORS.get(family, set())


def test_gemma3_multimodal_checkpoint_exports_its_text_model(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = len(tokenizer)
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": n + 8, "head_dim": 16, "query_pre_attn_scalar": 16,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=n + 1, boi_token_index=n + 2, eoi_token_index=n + 3)
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")

    check = export.write_and_check(tmp_path / "merged", tmp_path / "model.gguf", "f32")
    assert check.passed and check.greedy_tokens_equal and check.architecture == "gemma3"
    names = {t.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    assert "token_embd.weight" in names and not [n for n in names if n.startswith(("v.", "mm."))]  # no vision tower


def test_a_wrong_hyperparameter_in_the_metadata_fails_the_check(family_folders, tmp_path, monkeypatch):
    real = gguf.GGUFWriter.add_layer_norm_rms_eps
    monkeypatch.setattr(gguf.GGUFWriter, "add_layer_norm_rms_eps", lambda self, value: real(self, 10 * value))
    with pytest.raises(QloraKitError, match=r"metadata mismatches: \['rms_norm_eps"):
        export.write_and_check(family_folders["qwen2"], tmp_path / "model.gguf", "f32")


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q4_0"])
def test_quantized_gguf_matches_the_model_with_the_same_rounding(quant, family_folders, tmp_path):
    path = tmp_path / f"model-{quant}.gguf"
    check = export.write_and_check(family_folders["llama"], path, quant)

    assert check.passed and check.max_abs_logit_diff_vs_rounded <= check.tolerance
    assert check.max_abs_logit_diff_vs_merged > 0  # the rounding is real, and recorded
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == export.QUANT_TYPES[quant][0]
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    expected_output = gguf.GGMLQuantizationType.Q8_0 if quant == "q4_0" else types["blk.0.attn_q.weight"]
    assert types["output.weight"] == expected_output  # 4-bit types keep the output layer at 8 bits


def test_a_wrong_q_k_layout_fails_the_check_and_writes_nothing(family_folders, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "permute_rows", lambda weight, n_head: weight)  # the Llama rotary layout forgotten
    with pytest.raises(QloraKitError, match="GGUF check failed"):
        export.export_gguf(family_folders["llama"], tmp_path / "model.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_gemma_norm_offset_fails_the_check(family_folders, tmp_path, monkeypatch):
    real = export.gguf_tensor

    def no_offset(arch, name, data, name_map):
        gguf_name, stored = real(arch, name, data, name_map)
        return gguf_name, stored - 1 if name.endswith("norm.weight") else stored

    monkeypatch.setattr(export, "gguf_tensor", no_offset)
    with pytest.raises(QloraKitError, match="GGUF check failed"):
        export.write_and_check(family_folders["gemma2"], tmp_path / "model.gguf", "f32")


def test_unsupported_architecture_is_named_with_the_supported_list():
    config = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(QloraKitError, match=r"does not support GPT2LMHeadModel \(supported: .*LlamaForCausalLM"):
        export.architecture_of(config)


# ------------------------------------------------------------------------------------------------ tokenizer


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_byte_level_tokenizer_metadata_is_llama_cpp_gpt2_vocab(family_folders, tiny_tokenizer, tmp_path):
    path = tmp_path / "model.gguf"
    export.write_model_gguf(family_folders["qwen2"], path, "f16")
    meta = metadata(path)
    vocab = tiny_tokenizer.get_vocab()
    tokenizer_json = json.loads((family_folders["qwen2"] / "tokenizer.json").read_text())

    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(meta["tokenizer.ggml.merges"]) == len(tokenizer_json["model"]["merges"])
    types = meta["tokenizer.ggml.token_type"]
    assert types[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[vocab["Ġriver"]] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert meta["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert meta["tokenizer.chat_template"] == tiny_tokenizer.chat_template
    assert meta["general.architecture"] == "qwen2"


def byte_fallback_tokenizer_folder(folder: Path) -> Path:
    """A SentencePiece-style tokenizer as HF converts Llama 2 / Mistral / Gemma: BPE with byte fallback, Metaspace."""
    from conftest import tokenizer_corpus
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")  # what HF writes for legacy=False Llama
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                  show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return folder


def test_byte_fallback_tokenizer_metadata_is_llama_cpp_llama_vocab(family_folders, tmp_path):
    folder = tmp_path / "mistral"
    shutil.copytree(family_folders["mistral"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(byte_fallback_tokenizer_folder(tmp_path / "spm"))
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(tokenizer) + 3  # a padded embedding, as many models have
    (folder / "config.json").write_text(json.dumps(config))
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**config))
    model.save_pretrained(folder)

    path = tmp_path / "model.gguf"
    export.write_model_gguf(folder, path, "f16")
    meta = metadata(path)

    assert meta["tokenizer.ggml.model"] == "llama"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tokenizer) + 3 and tokens[-1] == f"[PAD{len(tokenizer) + 2}]"
    assert tokens[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "tokenizer.ggml.merges" not in meta  # llama.cpp's SPM vocabulary works from scores
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "Shout the words apple river."
    assert loaded(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------------------------------- Ollama

# Chat templates as the models ship them (trimmed of tool-calling branches that a plain conversation never reaches).
TEMPLATES = {
    "chatml": ("", None),  # the tiny tokenizer's own
    "smollm2": ("", "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}"),
    "llama3": ("<|begin_of_text|>",
               "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "gemma2": ("<bos>",
               "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
               "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
               "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
               "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
               "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
               "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{'<start_of_turn>model\n'}}{% endif %}"),
    "gemma3": ("<bos>",
               "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
               "messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
               "{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
               "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}"
               "{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
               "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
               "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"),
    "phi3": ("", "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
                 "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
                 "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + "
                 "message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"),
    "phi4-mini": ("", "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + "
                      "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}"
                      "{{ eos_token }}{% endif %}"),
    "mistral": ("<s>", "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                       "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                       "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
                       "roles are supported!') }}{% endif %}{% endfor %}"),
    # Mistral v0.3 puts the system prompt into the last user turn: no system message in the Ollama TEMPLATE.
    "mistral-v0.3": ("<s>", "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]"
                            "['content'] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages "
                            "= messages %}{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
                            "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
                            "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
                            "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
                            "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
                            "{%- endif %}{%- endfor %}"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Answer in capitals."}, {"role": "user", "content": "Shout apple."}],
    [{"role": "user", "content": "Shout apple."}, {"role": "assistant", "content": "APPLE"},
     {"role": "user", "content": "Now river,\nplease."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
]


def tokenizer_with_template(tiny_tokenizer, name: str):
    bos, template = TEMPLATES[name]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    if template is not None:
        tokenizer.chat_template = template
    if bos:
        tokenizer.add_special_tokens({"bos_token": bos})
    return tokenizer


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_ollama_template_renders_the_chat_template_prompt(name, tiny_tokenizer):
    tokenizer = tokenizer_with_template(tiny_tokenizer, name)
    adds_bos = bool(TEMPLATES[name][0])  # Llama 3, Gemma, Mistral: llama.cpp adds BOS itself
    template = export.ollama_template(tokenizer, adds_bos)
    go = template.go_template()

    assert template.drop_bos == TEMPLATES[name][0]
    assert template.system == (name not in ("gemma2", "mistral", "mistral-v0.3"))
    compared = 0
    for messages in CONVERSATIONS:
        if messages[0]["role"] == "system" and not template.system:
            continue
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.drop_bos + export.render_go_template(go, messages) == expected
        compared += 1
    assert compared >= 2


def test_ollama_template_refuses_a_template_it_cannot_express(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)
    # the number of earlier turns changes the text: no per-role text can say that
    tokenizer.chat_template = ("{% for m in messages %}<{{ loop.index }}:{{ m['role'] }}>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<go>{% endif %}")
    with pytest.raises(QloraKitError, match="cannot be written as an Ollama TEMPLATE"):
        export.ollama_template(tokenizer, adds_bos=False)


def test_go_template_renderer_follows_go_semantics_for_the_subset():
    template = ('{{ $prev := "" }}{{ range .Messages }}{{ $key := printf "%s>%s" $prev .Role }}'
                '{{ if eq $key ">user" }}[first]{{ else if eq $key "assistant>user" }}[again]{{ else }}[other]'
                '{{ end }}{{ .Content }}{{ $prev = .Role }}{{ end }}{{ if eq $prev "user" }}<gen>{{ end }}')
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert export.render_go_template(template, messages) == "[first]a[other]b[again]c<gen>"
    with pytest.raises(ValueError, match="cannot evaluate"):
        export.render_go_template("{{ .Prompt }}", messages)


# ------------------------------------------------------------------------------------ the CLI on a trained run


def qlora_kit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_kit", *args], capture_output=True, text=True, timeout=600)


def test_export_gguf_writes_a_checked_file_and_refuses_to_overwrite_it(finished_run, tmp_path):
    out = tmp_path / "shout.gguf"
    result = qlora_kit("export", str(finished_run), "--format", "gguf", "--quant", "q8_0", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    check = json.loads((tmp_path / "shout.check.json").read_text())
    assert check["passed"] and check["quant"] == "q8_0" and check["tokenizer_ids_equal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shout.check.json", "shout.gguf"]  # no temp leftovers

    again = qlora_kit("export", str(finished_run), "--out", str(out))
    assert again.returncode == 2 and "already exists; pass --force" in again.stderr


def test_force_replaces_only_qlora_kit_s_own_exports(finished_run, tmp_path):
    """--force replaces a GGUF with its check beside it, an Ollama folder with its gguf_check.json; the user's own
    folder or file at --out is refused and left as it was, before anything is merged or written."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(QloraKitError, match=r"mine is not an export qlora-kit wrote \(no gguf_check.json in it\); "
                                            r"--force replaces only qlora-kit's own exports"):
        export.export_run(finished_run, "ollama", "f16", mine, force=True)
    with pytest.raises(QloraKitError, match=r"mine is a folder; --out names the .gguf file to write"):
        export.export_run(finished_run, "gguf", "f16", mine, force=True)
    with pytest.raises(QloraKitError, match=r"notes.txt is not an export qlora-kit wrote \(no notes.check.json "):
        export.export_run(finished_run, "gguf-lora", "f16", mine / "notes.txt", force=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"

    out = tmp_path / "adapter.gguf"
    export.export_run(finished_run, "gguf-lora", "f16", out)
    first = out.stat().st_mtime_ns
    assert export.export_run(finished_run, "gguf-lora", "f16", out, force=True) == out
    assert out.stat().st_mtime_ns != first and (tmp_path / "adapter.check.json").is_file()


def test_export_ollama_writes_gguf_modelfile_with_template_stops_and_system_prompt(finished_run, tmp_path):
    out = tmp_path / "ollama"
    assert export.export_run(finished_run, "ollama", "f16", out) == out
    assert sorted(p.name for p in out.iterdir()) == [FOLDER_MANIFEST, "Modelfile", "gguf_check.json", "model.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """Answer in capitals."""' in modelfile
    go = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(finished_run / "merged")
    messages = [{"role": "system", "content": "Answer in capitals."}, {"role": "user", "content": "Shout apple."}]
    assert export.render_go_template(go, messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert json.loads((out / "gguf_check.json").read_text())["passed"]


def test_export_gguf_lora_writes_llama_cpp_adapter_tensors(finished_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter.gguf"
    assert export.export_run(finished_run, "gguf-lora", "f32", out) == out
    reader = gguf.GGUFReader(out)
    meta = metadata(out)
    adapter = load_file(finished_run / "adapter" / "adapter_model.safetensors")
    settings = json.loads((finished_run / "adapter" / "adapter_config.json").read_text())

    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == settings["lora_alpha"]
    assert len(reader.tensors) == len(adapter)
    tensors = {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    a = adapter["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_a"], a)
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    stored = tensors["blk.0.attn_q.weight.lora_b"]
    assert not np.array_equal(stored, b) and np.array_equal(export.unpermute_rows(stored, 4), b)  # llama.cpp's rows
    assert json.loads((tmp_path / "adapter.check.json").read_text())["passed"]


# ---------------------------------------------------------------------------------------- recipe and pipeline


def test_recipe_export_gguf_and_ollama_keys_are_strict(make_recipe):
    recipe = load_recipe(make_recipe(export={"gguf": {"quant": "q4_0"}, "ollama": True}))
    assert recipe.export.gguf.quant == "q4_0" and recipe.export.ollama
    assert load_recipe(make_recipe(name="plain")).export.gguf is None
    with pytest.raises(RecipeError, match=r"export.gguf.quant: 'q4_k_m' is not one of"):
        load_recipe(make_recipe(name="bad", export={"gguf": {"quant": "q4_k_m"}}))
    with pytest.raises(RecipeError, match="need the merged model"):
        load_recipe(make_recipe(name="nomerge", export={"merge": False, "ollama": True}))


def test_training_with_export_gguf_and_ollama_leaves_checked_files_in_the_run(make_recipe, tmp_path):
    from qlora_kit.pipeline import run_training

    run_training(load_recipe(make_recipe(name="exported", export={"gguf": {"quant": "q8_0"}, "ollama": True,
                                                                   "report": False})))
    run = tmp_path / "outputs" / "exported"
    assert json.loads((run / "gguf" / "model-q8_0.check.json").read_text())["passed"]
    assert (run / "gguf" / "model-q8_0.gguf").is_file()
    assert sorted(p.name for p in (run / "ollama").iterdir()) == [FOLDER_MANIFEST, "Modelfile", "gguf_check.json",
                                                                  "model.gguf"]
    assert not [p for p in run.rglob(".*") if "partial" in p.name or p.name.startswith((".gguf-merge", ".model-"))]


# ------------------------------------------------------------------------------------------ SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2_merged(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct with a LoRA of random non-zero weights merged in: a merged model that is not the base."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from gguf_quant_table import smollm2_with_random_lora

    return smollm2_with_random_lora(tmp_path_factory.mktemp("smollm2") / "merged")


@pytest.mark.slow
def test_smollm2_f16_gguf_answers_the_check_prompts_like_the_merged_model(smollm2_merged, tmp_path):
    check = export.write_and_check(smollm2_merged, tmp_path / "model.gguf", "f16")

    assert check.passed
    assert check.greedy_tokens_equal and check.greedy_gguf == check.greedy_merged
    assert check.tokenizer_ids_equal  # transformers rebuilds the same tokenizer from the GGUF metadata
    # the quickstart base is transformers' conversion of a GGUF: a plain byte-level pre-tokenizer (no digit split)
    assert metadata(tmp_path / "model.gguf")["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.slow
def test_smollm2_q8_0_gguf_predicts_the_merged_models_next_tokens(smollm2_merged, tmp_path):
    """q8_0 rounds each weight to 8 bits: the next token agrees at every prompt position (docs/export.md has the
    measured logit differences), while a 16-token continuation may part at a near tie."""
    check = export.write_and_check(smollm2_merged, tmp_path / "model.gguf", "q8_0")

    assert check.passed
    assert check.top1_agreement_vs_merged == 1.0  # the last prompt position included: the first answer token


@pytest.mark.slow
def test_smollm2_modelfile_renders_its_chat_template_with_the_default_system_prompt(smollm2_merged, tmp_path):
    text = export.write_modelfile(tmp_path, smollm2_merged, None)
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_merged)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert export.render_go_template(template, messages) == expected
    assert "You are a helpful AI assistant named SmolLM" in template
    assert 'PARAMETER stop "<|im_end|>"' in text and "\nSYSTEM " not in text


@pytest.mark.parametrize("quant", ["q8_0", "q4_1", "bf16", "f16"])
def test_row_parallel_quantize_writes_the_bytes_gguf_writes(quant, monkeypatch):
    """The export quantizes row blocks on several threads; the bytes must be gguf.quants' own, whatever the split."""
    monkeypatch.setattr(export.os, "cpu_count", lambda: 7)  # 7 uneven blocks of rows
    qtype = export.QUANT_TYPES[quant][0]
    data = np.random.default_rng(0).standard_normal((1031, 1024)).astype(np.float32)
    expected = gguf.quants.quantize(data, qtype)
    assert np.array_equal(export.quantize(data, qtype), expected)
    assert np.array_equal(export.round_trip(data, qtype), gguf.quants.dequantize(expected, qtype))


def test_export_refuses_before_writing_when_the_check_cannot_fit_in_host_memory(finished_run, tmp_path, monkeypatch):
    merged = export.merge_adapter(finished_run, out=tmp_path / "merged")
    params = export.parameter_count(Path(merged))
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert params == sum(p.numel() for p in model.state_dict().values())  # from the headers alone
    monkeypatch.setattr(export, "available_host_bytes", lambda: int(params * export.CHECK_HOST_BYTES_PER_PARAMETER) - 1)
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(QloraKitError, match=r"host memory for its check .* nothing was written"):
        export.export_gguf(Path(merged), target, "q8_0")
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.setattr(export, "available_host_bytes", lambda: None)  # a kernel that does not say: no refusal
    assert export.export_gguf(Path(merged), target, "q8_0").is_file()


def test_available_host_bytes_reads_the_kernels_estimate():
    available = export.available_host_bytes()
    if Path("/proc/meminfo").is_file():
        assert available is not None and 2**20 < available < 2**50
    else:
        assert available is None
