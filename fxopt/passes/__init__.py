"""Graph passes. Importing this package registers the built-in passes by name."""
from .base import CompileContext, FunctionPass, Pass, PassResult, available_passes, register_pass, resolve
from . import canonicalize, cuda_graph, dce, fold_linear, fuse, kv_cache, position_tables, prefetch, quantize, shard  # noqa: F401 - register the built-in passes
from .manager import PassManager, PassRecord, Report

__all__ = ["CompileContext", "FunctionPass", "Pass", "PassResult", "PassManager", "PassRecord", "Report",
           "available_passes", "register_pass", "resolve"]
