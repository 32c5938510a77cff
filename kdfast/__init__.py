"""kdfast: compiled knowledge distillation for vision students (see DESIGN.md)."""

__version__ = "0.1.0"
