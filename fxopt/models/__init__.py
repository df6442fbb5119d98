"""Model loading for fxopt, including the bundled default (SmolLM2-135M-Instruct)."""

from .hub import (
    DEFAULT_MODEL_NAME,
    BundledModelNotFoundError,
    ModelNotFoundError,
    cache_dir,
    default_model_dir,
    find_bundled_gguf,
    load_model,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "BundledModelNotFoundError",
    "ModelNotFoundError",
    "cache_dir",
    "default_model_dir",
    "find_bundled_gguf",
    "load_model",
]
