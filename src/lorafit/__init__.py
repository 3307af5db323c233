"""lorafit: Hydra-driven LoRA fine-tuning on Lightning."""

__version__ = "0.1.0"
