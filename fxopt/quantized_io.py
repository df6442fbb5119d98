"""Save a quantized compiled model as one safetensors file; load it without quantizing again.

    compiled = fxopt.compile(model, passes=["canonicalize", "kv_cache", "fuse", "quantize", "dce"],
                             quant_bits=8, quant_group_size=64)
    save_quantized(compiled, "smollm2-int8-g64.safetensors")

    with torch.device("meta"):                       # no float weights are ever materialized
        model = AutoModelForCausalLM.from_config(config)
    compiled = load_quantized(model, "smollm2-int8-g64.safetensors", max_batch_size=4, max_seq_len=512)

The file holds every tensor the compiled graph reads (``get_attr`` targets), the quantized
``qweight`` / ``scales`` and the float weights that stayed (embeddings, norms, biases, a float LM
head), under their graph names; the KV cache is state, not saved. Tensors that share storage (a
tied embedding) are stored once. The safetensors metadata (all strings) says what it is:

=================== ===========================================================================
``format``          ``fxopt.quantized``
``format_version``  ``1``
``fxopt_version``   the fxopt that wrote it
``model_class``     e.g. ``LlamaForCausalLM``
``bits``            ``8`` or ``4``
``group_size``      an int, or ``row``
``passes``          JSON list: the pipeline that made the graph (re-run at load: graph names depend on it)
``options``         JSON: the compile options (quant_* and the rest that were JSON-able)
``layers``          JSON list, per quantized linear: ``name`` (the float weight it replaced),
                    ``qweight``, ``scales``, ``sources``, ``out_features``, ``in_features``,
                    ``group_size``, ``bits``, ``head``, ``weight_rel_err``, ``output_rel_err``
``aliases``         JSON ``{graph name: stored name}`` for tensors stored once
=================== ===========================================================================

``load_quantized`` compiles the model again with the saved pipeline and quant options, with the
``quantize`` pass only planning (``quant_placeholders=True``: meta-device placeholders, nothing
quantized), then fills every tensor from the file, checking name, shape and dtype; an error names
the tensor and the file. The accuracy columns of the report are those measured when the file was
made.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.fx as fx

from .errors import FxoptError
from .ir import set_attribute

FORMAT = "fxopt.quantized"
FORMAT_VERSION = "1"
_QUANT_OPTIONS = ("quant_bits", "quant_group_size", "quant_lm_head", "quant_include", "quant_exclude")


class QuantizedFileError(FxoptError, ValueError):
    """A quantized safetensors file that does not fit the model it is loaded into."""


def _cache_names(gm: fx.GraphModule, info) -> set[str]:
    kv = (getattr(info, "state", {}) or {}).get("kv_cache") or {}
    return {name for pair in kv.get("layers", ()) for name in pair}


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def graph_tensors(gm: fx.GraphModule, info=None) -> dict[str, torch.Tensor]:
    """Every tensor a ``get_attr`` node reads, by target, less the KV cache buffers."""
    skip = _cache_names(gm, info)
    out = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        if node.target in skip or node.target in out:
            continue
        value = _fetch(gm, node.target)
        if isinstance(value, torch.Tensor):
            out[node.target] = value
    return out


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def save_quantized(compiled, path) -> Path:
    """Write ``compiled``'s quantized and float weights, with metadata, to one safetensors file."""
    from safetensors.torch import save_file

    from . import __version__

    info = compiled.info
    state = info.state.get("quantize")
    if not state:
        raise QuantizedFileError("save_quantized: the model was not compiled with the 'quantize' pass")
    if state.get("placeholders") and not state.get("loaded"):
        raise QuantizedFileError("save_quantized: the quantized weights are placeholders (meta device) that were "
                                 "never filled; load them first (fxopt.quantized_io.load_quantized)")
    path = Path(path)
    tensors, aliases, stored = {}, {}, {}
    for name, t in graph_tensors(compiled.graph_module, info).items():
        if t.is_meta:
            raise QuantizedFileError(f"save_quantized: tensor '{name}' is on the meta device (never loaded)")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in stored:
            aliases[name] = stored[key]
            continue
        stored[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    passes = [r.name for r in compiled.report() if not r.skipped]
    options = {k: v for k, v in compiled.ctx.options.items() if _jsonable(v) and k != "quant_placeholders"}
    layers = [{k: r[k] for k in ("name", "qweight", "scales", "sources", "out_features", "in_features", "group_size",
                                 "bits", "head", "weight_rel_err", "output_rel_err")} for r in state["layers"]]
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fxopt_version": __version__,
        "model_class": info.model_class, "bits": str(state["bits"]), "group_size": str(state["group_size"]),
        "passes": json.dumps(passes), "options": json.dumps(options), "layers": json.dumps(layers),
        "aliases": json.dumps(aliases),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_metadata(path) -> dict:
    """The fxopt metadata of a quantized file, JSON fields decoded."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise QuantizedFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - a corrupt header
        raise QuantizedFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT:
        raise QuantizedFileError(f"{path}: not an fxopt quantized file (metadata format={meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); save it with fxopt.quantized_io.save_quantized")
    if meta.get("format_version") != FORMAT_VERSION:
        raise QuantizedFileError(f"{path}: format version {meta.get('format_version')!r}; this fxopt reads "
                                 f"{FORMAT_VERSION!r}")
    out = dict(meta)
    for key in ("passes", "options", "layers", "aliases"):
        out[key] = json.loads(meta.get(key) or ("{}" if key in ("options", "aliases") else "[]"))
    return out


def load_quantized(model: torch.nn.Module, path, *, device=None, **compile_options):
    """Compile ``model`` with the file's pipeline and quant options and fill it from ``path``.

    ``model`` may be built on the meta device (no weights at all). ``device``: where the weights
    go (default: the model's, or the CPU for a meta model). ``compile_options``: anything
    ``fxopt.compile`` takes (``max_batch_size``, ``max_seq_len``, ``passes``, ``dump_dir``, ...);
    quant options must agree with the file's or be left out.
    """
    from safetensors import safe_open

    from .compiler import compile as fxopt_compile

    path = Path(path)
    meta = read_metadata(path)
    saved = meta["options"]
    for key in _QUANT_OPTIONS:
        if key in compile_options and compile_options[key] != saved.get(key):
            raise QuantizedFileError(f"{path}: was quantized with {key}={saved.get(key)!r}; "
                                     f"load_quantized got {key}={compile_options[key]!r}")
    passes = compile_options.pop("passes", None) or meta["passes"]
    if "quantize" not in [p if isinstance(p, str) else getattr(p, "name", None) for p in passes]:
        raise QuantizedFileError(f"{path}: the pipeline {passes} has no 'quantize' pass")
    options = {**saved, **compile_options, "quant_placeholders": True}
    if device is None:
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    device = torch.device(device)

    compiled = fxopt_compile(model, passes=passes, **options)
    gm, info = compiled.graph_module, compiled.info
    _check_plan(path, meta, info.state.get("quantize"))
    wanted = graph_tensors(gm, info)
    aliases = meta["aliases"]
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        stored = set(f.keys())
        missing = [n for n in wanted if aliases.get(n, n) not in stored]
        if missing:
            users = {n.target: n for n in gm.graph.find_nodes(op="get_attr")}
            extra = sorted(stored - {aliases.get(n, n) for n in wanted})
            raise QuantizedFileError(
                f"{path}: no tensor '{missing[0]}' (read by %{users[missing[0]].name})"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                + f"; the file was written for the pipeline {meta['passes']}"
                + (f" (it has {len(extra)} tensor(s) this graph does not read, e.g. '{extra[0]}')" if extra else ""))
        for name, current in wanted.items():
            key = aliases.get(name, name)
            sl = f.get_slice(key)
            shape, dtype = list(sl.get_shape()), _dtype(sl.get_dtype())
            if shape != list(current.shape) or dtype != current.dtype:
                raise QuantizedFileError(
                    f"{path}: tensor '{key}' has shape {shape} and dtype {dtype}; the compiled graph expects "
                    f"'{name}' of shape {list(current.shape)} and dtype {current.dtype}")
            try:
                tensor = f.get_tensor(key)
            except Exception as e:  # noqa: BLE001 - name the tensor and the file
                raise QuantizedFileError(f"{path}: cannot read tensor '{key}' ({type(e).__name__}: {e})") from e
            set_attribute(gm, name, tensor)
    from .checkpoint import allocate_runtime_buffers, retarget_device
    allocate_runtime_buffers(gm, device)  # the KV cache, made on the meta device for a meta model
    retarget_device(gm, device)  # device constants a meta capture left in the graph
    left = [n for n, t in list(gm.named_parameters()) + list(gm.named_buffers()) if t.is_meta]
    if left:
        raise QuantizedFileError(f"after loading, '{left[0]}' is still on the meta device"
                                 + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    state = info.state["quantize"]
    by_name = {r["name"]: r for r in meta["layers"]}
    for row in state["layers"]:
        saved_row = by_name.get(row["name"], {})
        row["weight_rel_err"] = saved_row.get("weight_rel_err")
        row["output_rel_err"] = saved_row.get("output_rel_err")
    state.update(loaded=str(path), note=f"weights loaded from {path}; errors as measured when it was saved")
    return compiled


def _dtype(name: str) -> torch.dtype | str:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table.get(name, name)


def _check_plan(path, meta, state) -> None:
    """The linears the pass planned are the ones the file quantized (same buffers, same shapes)."""
    planned = {r["qweight"]: r for r in (state or {}).get("layers", [])}
    saved = {r["qweight"]: r for r in meta["layers"]}
    if set(planned) != set(saved):
        only_file = sorted(set(saved) - set(planned))
        only_graph = sorted(set(planned) - set(saved))
        raise QuantizedFileError(
            f"{path}: the file quantized {len(saved)} linear(s), the compiled graph {len(planned)}"
            + (f"; in the file only: '{only_file[0]}'" if only_file else "")
            + (f"; in the graph only: '{only_graph[0]}'" if only_graph else "")
            + " (compile with the file's pipeline and quant options)")


__all__ = ["FORMAT", "QuantizedFileError", "graph_tensors", "load_quantized", "read_metadata", "save_quantized"]
