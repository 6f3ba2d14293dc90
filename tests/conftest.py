"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the tests import fastrl.kernels."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402


def _poisoned(factory):
    def wrapper(*args, **kwargs):
        t = factory(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty* returns NaN-filled memory, so an output a kernel forgot to write cannot pass.

    Opt in per module with `pytestmark = pytest.mark.usefixtures("poison_empty")` (kernel tests do; model code
    from other libraries is not held to it)."""
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))


@pytest.fixture
def vocabulary_chunks(monkeypatch):
    """The torch sweeps on row blocks × vocabulary chunks (forward_sweep.chunk_shape) at test sizes: tiles of at
    most 32 rows × 256 columns, several of each. At real sizes whole_rows_fit chooses them (V 151936)."""
    from fastrl.kernels import forward_sweep, grad_sweep, grpo_single_pass
    for module in (forward_sweep, grad_sweep, grpo_single_pass):
        monkeypatch.setattr(module, "whole_rows_fit", lambda *_: False)
    monkeypatch.setattr(forward_sweep, "BLOCK_ROWS", 32)
    monkeypatch.setattr(forward_sweep, "TILE_ELEMENTS", 1 << 12)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; unverified on these CPU-only machines")
    if not torch.cuda.is_available():
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on 2 cores shared with other jobs, one thread is several times faster
    than two oversubscribed ones, and deterministic. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")` (the trainer tests do)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tests/helpers_tiny's Llama and tokenizer, saved once per module (a folder for GRPOTrainer(model=...))."""
    import helpers_tiny

    return helpers_tiny.save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))
