"""Plain nn.Module definitions and a registry by name. Nothing here knows about distribution."""
from models.registry import MODEL_NAMES, build_model

__all__ = ["MODEL_NAMES", "build_model"]
