"""Tokenizer + 4-bit base (bitsandbytes) + prepare_model_for_kbit_training + LoRA (peft)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from qlora_kit.data import resolve_chat_template
from qlora_kit.recipe import (
    LoraSection,
    ModelSection,
    QloraKitError,
    Recipe,
    RecipeError,
    at,
    did_you_mean,
    error_summary,
    hub_model_unavailable,
    start_adapter_folder,
)
from qlora_kit.rundir import atomic_folder

log = logging.getLogger("qlora_kit")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}


def resolve_dtype(name: str, what: str) -> torch.dtype:
    """Turn a recipe dtype name into a torch dtype; `auto` follows the hardware and says what it picked."""
    if name != "auto":
        dtype = DTYPES[name]
        if dtype is torch.bfloat16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise RecipeError(f"{what}: bf16 is not supported by {torch.cuda.get_device_name()}; use fp16 or auto")
        return dtype
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        log.warning("%s: auto -> fp16 (%s has no bf16)", what, torch.cuda.get_device_name())
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def model_file_errors(recipe: Recipe, folder: str, what: str,
                      errors: tuple[type[Exception], ...] = (OSError, ValueError)) -> Iterator[None]:
    """The base model's files as the recipe's error, the same in `validate`, `data` and `train`. A Hub id that cannot
    be fetched (transformers' OSError: offline, no network, unknown or gated id): the one message with the fix. A
    local folder whose `what` (config.json, tokenizer, weights) transformers cannot read (its OSError without an errno,
    ValueError: missing files, bad JSON, no model_type, no tokenizer.json; `errors` for the weights: a missing or
    truncated safetensors file): that folder named, with what it must hold. Real file-system errors (an errno:
    permissions, a full disk) go on to the CLI's own messages."""
    try:
        yield
    except errors as exc:
        why = error_summary(exc)
        if not Path(folder).expanduser().exists():
            if not isinstance(exc, OSError):
                raise
            raise RecipeError(hub_model_unavailable(recipe, why)) from None
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise RecipeError(f"{at(recipe.source, 'model.name')}: cannot read {what} in {folder} ({why}); a local model "
                          "folder must hold what save_pretrained writes: config.json with its model_type, the "
                          "tokenizer (tokenizer.json) and the weights (*.safetensors)") from None


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_KIT_CACHE", Path.home() / ".cache" / "qlora-kit"))


def base_model_folder(model: ModelSection) -> str:
    """The name or folder `from_pretrained` should read: the model itself, or the cached conversion of its GGUF."""
    if model.gguf_file is None:
        return model.name
    target = gguf_cache_folder(model)
    if not (target / "config.json").is_file():
        convert_gguf((Path(model.name).expanduser() / model.gguf_file).resolve(), target)
    return str(target)


def gguf_cache_folder(model: ModelSection) -> Path:
    """Where the HF conversion of `model.gguf_file` is cached; keyed by the file's path, size and mtime."""
    gguf_path = (Path(model.name).expanduser() / model.gguf_file).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into an HF folder, written to a temp dir and renamed, so a kill leaves no half."""
    log.info("converting %s to an HF folder (once; cached in %s)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None  # the weights are dequantized; a leftover GgufConfig blocks 4-bit loading
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # GGUF metadata can name a different EOS than the generation config (SmolLM2: <|im_start|> vs <|im_end|>);
    # the generation config is what inference stops on, so the tokenizer follows it.
    eos_id = first_id(loaded.generation_config.eos_token_id)
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        eos = tokenizer.convert_ids_to_tokens(eos_id)
        log.info("GGUF tokenizer EOS %r differs from the generation config's %r; using %r", tokenizer.eos_token,
                 eos, eos)
        tokenizer.eos_token = eos
    with atomic_folder(target, replace=False) as tmp:  # another process may finish first: keep its copy
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def first_id(ids: int | list[int] | None) -> int | None:
    return ids[0] if isinstance(ids, list) and ids else ids if isinstance(ids, int) else None


def load_tokenizer(recipe: Recipe, folder: str) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and a chat template; training on chat rows needs both."""
    m = recipe.model
    with model_file_errors(recipe, folder, "the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(folder, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if not tokenizer.is_fast:
        raise QloraKitError(f"{m.name}: only fast tokenizers are supported (loss masks need token offsets)")
    tokenizer.chat_template = resolve_chat_template(recipe.data.chat_template, tokenizer)
    if tokenizer.chat_template is None:
        raise RecipeError(f"{recipe.source}: model.name: the tokenizer of {m.name} has no chat template; set "
                          "data.chat_template (chatml, llama-3, mistral or inline Jinja), or use the instruct variant")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; padding with EOS %r (padding is masked out of the loss)",
                 tokenizer.eos_token)
    return tokenizer


def build_quantization_config(recipe: Recipe, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    q = recipe.quantization
    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=DTYPES[q.quant_storage],
    )


def under_fsdp() -> bool:
    """`accelerate launch` with an FSDP config sets this; FSDP then places and shards the weights itself."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def device_map_for_this_process() -> dict[str, int | str] | None:
    """Whole model on this process's device: under `accelerate launch` each rank holds its own replica."""
    if under_fsdp():
        return None
    if not torch.cuda.is_available():
        return {"": "cpu"}
    return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}


def load_base_model(recipe: Recipe, folder: str, compute_dtype: torch.dtype):
    """The frozen base, quantized as the recipe says."""
    m = recipe.model
    quantization = build_quantization_config(recipe, compute_dtype)
    from safetensors import SafetensorError

    with model_file_errors(recipe, folder, "the weights", (OSError, SafetensorError)):
        return AutoModelForCausalLM.from_pretrained(
            folder,
            revision=m.revision,
            quantization_config=quantization,
            dtype=compute_dtype if quantization else resolve_dtype(m.dtype, "model.dtype"),
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
            device_map=device_map_for_this_process(),
        )


def check_fsdp_quant_storage(recipe: Recipe, compute_dtype: torch.dtype) -> None:
    q = recipe.quantization
    if q.load_in_8bit:
        raise RecipeError(f"{recipe.source}: quantization.load_in_8bit: FSDP cannot shard LLM.int8 weights; use "
                          "4-bit (load_in_4bit: true) with quant_storage set to the compute dtype")
    if q.load_in_4bit and DTYPES[q.quant_storage] != compute_dtype:
        name = next(k for k, v in DTYPES.items() if v == compute_dtype)
        raise RecipeError(f"{recipe.source}: quantization.quant_storage: FSDP shards only float tensors of one "
                          f"dtype; set quantization.quant_storage={name} to match the compute dtype")


def build_lora_config(lora: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def build_quantized_model(recipe: Recipe, folder: str, compute_dtype: torch.dtype):
    """4-bit base -> prepare_model_for_kbit_training (non-reentrant checkpointing) -> LoRA adapters."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if under_fsdp():
        check_fsdp_quant_storage(recipe, compute_dtype)
    model = load_base_model(recipe, folder, compute_dtype)
    keep_4bit_weights_in_training_layout(model)
    if under_fsdp() or not upcasts_to_fp32(recipe, compute_dtype):
        # prepare_model_for_kbit_training upcasts norms and embeddings to fp32 (FSDP needs one dtype per shard, and
        # upcast_to_fp32: false asks for the compute dtype); the trainer switches checkpointing on, and the input
        # gradients that non-reentrant checkpointing of a frozen embedding needs are switched on here.
        model.enable_input_require_grads()
    elif recipe.quantization.load_in_4bit or recipe.quantization.load_in_8bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if recipe.model.adapter is not None:
        from peft import PeftModel

        folder = start_adapter_folder(recipe)  # checked against the lora section before any weight loaded
        model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        log.info("model.adapter: continuing the adapter in %s", folder)
    else:
        try:
            model = get_peft_model(model, build_lora_config(recipe.lora))
        except ValueError as exc:  # peft's message for unknown target modules is already specific
            raise RecipeError(f"{recipe.source}: lora.target_modules: {exc}") from None
    trainable, total = model.get_nb_trainable_parameters()
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def upcasts_to_fp32(recipe: Recipe, compute_dtype: torch.dtype) -> bool:
    """quantization.upcast_to_fp32, or when unset: only under fp16 compute (bf16 has fp32's range)."""
    chosen = recipe.quantization.upcast_to_fp32
    return compute_dtype is torch.float16 if chosen is None else chosen


def keep_4bit_weights_in_training_layout(model) -> None:
    """bitsandbytes (0.50) repacks a CPU 4-bit weight for its AVX512-BF16 inference kernel on the first eval-mode
    forward and never packs it back; that kernel has no backward, so after the before-training evaluation (or an eval
    loss between steps) no gradient would pass through any 4-bit layer. A model that trains keeps the plain layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def local_config_folder(model: ModelSection) -> str | None:
    """A local folder with the base model's config.json, found without downloading or converting anything.

    A local model folder, the cached conversion of a GGUF base, or a Hub model already in the Hugging Face cache;
    None when the config is not on this machine.
    """
    if model.gguf_file is not None:
        folder = gguf_cache_folder(model)
        return str(folder) if (folder / "config.json").is_file() else None
    path = Path(model.name).expanduser()
    if path.is_dir():
        return str(path) if (path / "config.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model.name, "config.json", revision=model.revision)
    except ValueError:  # not a valid Hub id
        return None
    return str(Path(cached).parent) if isinstance(cached, str) else None


def first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def targets_module(name: str, targets: str | list[str]) -> bool:
    """peft's rule for lora.target_modules: a list matches a full name or its dotted suffix; a string other than
    'all-linear' is a regular expression matched against the whole name."""
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def check_target_modules(recipe: Recipe, folder: str) -> list[str]:
    """Check lora.target_modules and lora.modules_to_save against the model's real module names.

    The model is instantiated from its config on the meta device (no weights, no memory), so a misspelt or
    wrong-family name (qkv_proj on Llama, q_proj on Phi-3) fails validation with the valid names listed, instead of
    failing in peft after the weights load. Returns the names of the layers LoRA can adapt.
    """
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    m = recipe.model
    config = model_config(recipe, folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code)
    arch = type(model).__name__
    head = model.get_output_embeddings()
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D))}
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in layers.items()
                     if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})
    where = f"{recipe.source}: lora.target_modules"
    valid = f"the linear layers of {arch} are: {', '.join(linear)}"
    names = [name for name, _ in model.named_modules()]
    for module in recipe.lora.modules_to_save or []:
        if not any(name == module or name.endswith("." + module) for name in names):
            raise RecipeError(f"{recipe.source}: lora.modules_to_save: {module!r} is not a module of {arch} "
                              f"(usually lm_head or embed_tokens)")
    targets = recipe.lora.target_modules
    if isinstance(targets, str):
        if targets != "all-linear" and not any(targets_module(name, targets) for name in layers):
            raise RecipeError(f"{where}: the pattern {targets!r} matches no layer name of {arch} (peft matches it "
                              f"against full names like {next(iter(layers))}); {valid}")
        return linear
    for target in targets:
        hits = [name for name in layers if targets_module(name, [target])]
        if not hits:
            raise RecipeError(f"{where}: {target!r} is not a layer of {arch}{did_you_mean(target, linear)}; {valid}")
        if all(layers[name] is head for name in hits):
            raise RecipeError(f"{where}: {target!r} is the output layer; trl computes log-probabilities from its "
                              f"weight directly, so a LoRA adapter there is never trained. Train it in full with "
                              f"lora.modules_to_save: [{target}] instead")
    return linear


def end_of_turn_token_ids(tokenizer: PreTrainedTokenizerBase, generation_eos: int | list[int] | None) -> list[int]:
    """Token ids that end an assistant turn: EOS, the generation config's EOS and the template's end-of-turn token."""
    ids = [tokenizer.eos_token_id]
    ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
    sentinel = "QLORAKITSENTINEL"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}], tokenize=False)
    after = tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if after and after[0] in special:
        ids.append(after[0])
    return sorted({i for i in ids if i is not None})


def liger_kernel_installed() -> bool:
    """liger-kernel (the `gpu` extra) is importable here; found without importing Triton."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# act(gate) * up as the fused MLP computes it (speed/lora_autograd.py), by the names transformers' configs give the
# activation: SiLU (Llama, Mistral, Qwen, Phi-3), GELU's tanh form (Gemma 2 and 3); other activations keep their MLP
FUSED_GATE_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def gate_activation_name(config) -> str | None:
    """The MLP activation a config names: hidden_activation (Gemma 2 and 3), else hidden_act (the others)."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)


def fused_mlp_blocker(model_config, lora_dropout: float = 0.0) -> str | None:
    """Why speed.fused_mlp leaves this model's MLPs alone, or None when it fuses them: GatedDownOver4bit computes
    silu(gate) * up or gelu_tanh(gate) * up, so another activation keeps its own forward, and it feeds the down
    projection's adapter the undropped product, so LoRA dropout keeps it out too. Here, not in speed/, because the
    speed plan and the memory estimate (which cannot import speed/) both read it."""
    if lora_dropout:
        return f"lora.dropout is {lora_dropout:g} (the fused MLP has no dropout before the down projection's adapter)"
    text = model_config.get_text_config()
    activation = gate_activation_name(text)
    if activation not in FUSED_GATE_ACTIVATIONS:
        return (f"{text.model_type}'s MLP is gated by {activation}, and only SiLU- and tanh-GELU-gated MLPs "
                "are fused")
    return None


def mlp_gate_activation(module) -> str | None:
    """How a gated MLP, down_proj(act(gate_proj(x)) * up_proj(x)), activates its gate, as the fused MLP names it
    ("silu": Llama, Mistral, Qwen, and Phi-3 with one gate_up_proj for both; "gelu_tanh": Gemma 2 and 3), or None
    for any other module or activation. Probes any module: transformers' MLP classes differ by architecture."""
    projections = hasattr(module, "gate_up_proj") or (hasattr(module, "gate_proj") and hasattr(module, "up_proj"))
    if not projections or not hasattr(module, "down_proj") or hasattr(module, "experts"):
        return None
    name = gate_activation_name(getattr(module, "config", None))  # their act_fn class varies by version
    if name is None and isinstance(getattr(module, "act_fn", None), torch.nn.SiLU):
        name = "silu"
    return FUSED_GATE_ACTIVATIONS.get(name)


def attention_build_error(recipe: Recipe, config, implementation: str) -> str | None:
    """Why transformers refuses to build this model class with `implementation` on this machine (Gemma 2 has no
    sdpa; flash_attention_2 needs flash-attn), as it checks when it builds the model: its first sentence, or None.
    Built on the meta device: no memory. Errors that are not about attention are raised as they are."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        try:
            AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code,
                                             attn_implementation=implementation)
        except (ValueError, ImportError) as exc:
            text = str(exc)
            if implementation not in text and "attention" not in text.lower():
                raise
            return first_sentence(text)
    return None


def check_attention(recipe: Recipe, config) -> None:
    """model.attn_implementation against the model class and this machine's packages: before the weights load, not
    as a traceback after."""
    m = recipe.model
    error = attention_build_error(recipe, config, m.attn_implementation)
    if error:
        raise RecipeError(f"{at(recipe.source, 'model.attn_implementation')}: {m.attn_implementation!r} cannot run "
                          f"this model here: {error}; set model.attn_implementation: eager (or another kernel the "
                          f"model and this machine support)")


def model_config(recipe: Recipe, folder: str):
    """The model's full config (config.json in `folder`), with the recipe's errors for a missing or bad one."""
    from transformers import AutoConfig

    with model_file_errors(recipe, folder, "config.json"):
        return AutoConfig.from_pretrained(folder, revision=recipe.model.revision,
                                          trust_remote_code=recipe.model.trust_remote_code)


FLEX = "flex_attention"  # transformers' name for PyTorch's flex attention (integrations/flex_attention.py)


def attention_dropout(config) -> float:
    """The model's attention dropout (0 where its config has none): flex attention has no dropout."""
    return getattr(config.get_text_config(), "attention_dropout", 0) or 0


def check_flex_attention(recipe: Recipe, config) -> None:
    """speed.attention_kernel: flex, asked for by name, on this machine and model: PyTorch's flex attention has no
    backward on CPU and no dropout, and transformers must have a flex path for the model class."""
    if recipe.speed.attention_kernel != "flex":
        return
    where = at(recipe.source, "speed.attention_kernel")
    if not torch.cuda.is_available():
        raise RecipeError(f"{where}: flex trains on a CUDA GPU only (PyTorch's flex attention has no backward on "
                          f"CPU); set it to auto or default on this machine")
    if dropout := attention_dropout(config):
        raise RecipeError(f"{where}: flex attention has no attention dropout, and the model's config sets "
                          f"attention_dropout: {dropout}; set it to default")
    error = attention_build_error(recipe, config, FLEX)
    if error:
        raise RecipeError(f"{where}: flex cannot run this model here: {error}; set it to auto or default")


def check_model_config(recipe: Recipe, folder: str):
    """Recipe checks that need the model's config, not its weights: run before anything heavy loads. Returns the
    config it checked (the model's full config) for callers that read it next."""
    from qlora_kit.recipe import check_hub_model_reachable

    check_hub_model_reachable(recipe)  # one quick look-up instead of transformers' minute of retries
    full_config = model_config(recipe, folder)
    check_attention(recipe, full_config)
    check_flex_attention(recipe, full_config)
    config = full_config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    if hidden and recipe.lora.r > hidden:
        raise RecipeError(f"{at(recipe.source, 'lora.r')}: {recipe.lora.r} is larger than the model's hidden size "
                          f"({hidden}); a rank above it adds memory but nothing a full-rank update could not do. Use "
                          f"at most {hidden} (8 to 64 is usual)")
    limit = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    scaled = rope.get("rope_type", rope.get("type", "default")) not in (None, "default")
    if limit and recipe.training.max_length > limit and not scaled and recipe.method == "grpo":
        raise RecipeError(
            f"{recipe.source}: grpo.max_prompt_length: with max_completion_length, {recipe.training.max_length} "
            f"tokens, longer than the model's max_position_embeddings ({limit}) and its config sets no RoPE "
            f"scaling; lower grpo.max_prompt_length to {limit - recipe.grpo.max_completion_length} or less")
    if limit and recipe.training.max_length > limit and not scaled:
        raise RecipeError(
            f"{recipe.source}: training.max_length: {recipe.training.max_length} is longer than the model's "
            f"max_position_embeddings ({limit}) and its config sets no RoPE scaling; lower training.max_length "
            f"to {limit}, or use a long-context variant of the model")
    return full_config
