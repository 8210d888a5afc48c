"""Shared test setup: strict kernel builds, device parameters, GPU/DeepEP skips."""

import contextlib
import os

# A failed kernel build must fail the tests, not fall back quietly.
os.environ.setdefault("FLEXDISPATCH_JIT", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _deepep_ready() -> bool:
    try:
        import deep_ep  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return HAS_CUDA and torch.cuda.device_count() >= 2


def pytest_collection_modifyitems(config, items):
    deepep_ok = _deepep_ready()
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "deepep" in item.keywords and not deepep_ok:
            item.add_marker(pytest.mark.skip(reason="needs deep_ep and >= 2 GPUs"))


@pytest.fixture
def poison():
    """Fill freed allocator memory with NaN so that rows a kernel forgets to write show up."""
    def _poison(device):
        if device == "cuda":
            junk = torch.full((64 << 20,), float("nan"), device="cuda")
            del junk
    return _poison


def new_green_context(num_sms: int):
    """``(context, None)``: a CUDA green context of ``num_sms`` multiprocessors of the current
    device (torch's ``torch.cuda.green_contexts``), not yet entered; or ``(None, why)`` where
    this torch, driver or card makes none."""
    green = getattr(torch.cuda, "green_contexts", None)
    if green is None or not getattr(green, "SUPPORTED", False):
        return None, "this torch has no CUDA green contexts"
    device = torch.cuda.current_device()
    try:
        try:
            return green.GreenContext.create(num_sms=num_sms, device_id=device), None
        except TypeError:  # (torch before 2.10 takes them by position)
            return green.GreenContext.create(num_sms, device), None
    except RuntimeError as exc:
        return None, f"no green context on this driver or card: {exc}"


@pytest.fixture
def green_context():
    """``green_context(num_sms)``: a context manager whose block runs in a green context of
    ``num_sms`` multiprocessors (:func:`new_green_context`; the block's work synchronized before
    it is left), or a skip where none can be made."""
    @contextlib.contextmanager
    def _within(num_sms: int):
        context, why = new_green_context(num_sms)
        if context is None:
            pytest.skip(why)
        context.set_context()
        try:
            yield
            torch.cuda.current_stream().synchronize()
        finally:
            context.pop_context()
    return _within
