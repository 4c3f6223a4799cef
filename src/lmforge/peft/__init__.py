"""Parameter-efficient fine-tuning: LoRA / DoRA (`lora`), 4-bit NF4 base weights for QLoRA
(`qlora`), soft prompts (`prompt`). Adapters are saved in Hugging Face PEFT's format."""

from .lora import LoraLinear, LoraSettings, apply_lora, load_adapter, merge_lora, save_adapter, set_merged

__all__ = [
    "LoraLinear",
    "LoraSettings",
    "apply_lora",
    "load_adapter",
    "merge_lora",
    "save_adapter",
    "set_merged",
]
