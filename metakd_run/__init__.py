"""metakd-run: config-driven MAML and meta knowledge distillation experiments."""

__version__ = "0.1.0"
