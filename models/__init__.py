"""Plain nn.Module definitions and a registry by name. Nothing here knows about distribution."""
from models.registry import MODEL_NAMES, ImportedFactory, RegistryFactory, build_model, import_factory

__all__ = ["MODEL_NAMES", "ImportedFactory", "RegistryFactory", "build_model", "import_factory"]
