"""qlora-kit: QLoRA fine-tuning of LLMs from YAML recipes (bitsandbytes + peft + trl)."""

from qlora_kit.recipe import QloraKitError, Recipe, RecipeError, load_recipe

__all__ = ["QloraKitError", "Recipe", "RecipeError", "load_recipe"]
