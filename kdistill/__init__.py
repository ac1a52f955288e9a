"""kdistill: knowledge distillation for Transformers, measured end to end."""

__version__ = "0.1.0"
