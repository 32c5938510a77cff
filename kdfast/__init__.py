"""kdfast: compiled knowledge distillation for vision students (README.md, docs/)."""

__version__ = "0.1.0"
