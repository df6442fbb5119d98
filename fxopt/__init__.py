"""fxopt: a compiler for PyTorch inference of large language models.

    >>> import fxopt
    >>> compiled = fxopt.compile(model, passes=["canonicalize", "kv_cache", "dce"], verify=True)
    >>> compiled.generate(input_ids, max_new_tokens=32)

A model is captured once into a ``torch.fx`` graph (``fxopt.capture``), a pipeline of passes
rewrites it in plain sight (``dump_dir=``, ``compiled.report()``), and the result is a drop-in
module.
"""
from .capture import CaptureInfo, Signature, capture
from .checkpoint import CheckpointError, compile_from_checkpoint, load_checkpoint, load_plan
from . import distributed  # noqa: F401 - fxopt.distributed.setup() for torchrun
from .compiler import compile, default_passes
from .errors import CaptureError, FxoptError, GenerationError, InputError, PassError, VerificationError
from .passes import CompileContext, Pass, PassResult, available_passes, register_pass
from .runtime import CompiledModel

__version__ = "0.1.0"

__all__ = [
    "CaptureError", "CaptureInfo", "CheckpointError", "CompileContext", "CompiledModel", "FxoptError", "GenerationError",
    "InputError", "Pass", "PassError", "PassResult", "Signature", "VerificationError", "available_passes",
    "capture", "compile", "compile_from_checkpoint", "default_passes", "load_checkpoint", "load_plan",
    "register_pass",
]
