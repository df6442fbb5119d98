"""What runs after compilation: the drop-in module, the generation loop, the CUDA-graph runner."""
from .compiled import CompiledModel

__all__ = ["CompiledModel"]
