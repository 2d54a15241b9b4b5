"""hotlora: one resident base model, many tenants' LoRA adapters, served and fine-tuned on-line."""

__version__ = "0.1.0"
