"""Which DeepEP builds get narrow rows, decided without a GPU (a stand-in deep_ep module)."""

import sys
import types

import pytest
import torch

from flexdispatch.managers import deepep


class FakeBuffer:
    sizes = (2, 4, 8, 16, 48)  # a config table with a size flexdispatch never listed (48)

    @staticmethod
    def is_sm90_compiled():
        return True

    @classmethod
    def get_dispatch_config(cls, num_ranks):
        assert num_ranks in cls.sizes, f"Unsupported number of EP ranks: {num_ranks}"
        return object()

    get_combine_config = get_dispatch_config


@pytest.fixture
def fake_deep_ep(monkeypatch):
    def install(with_topk_idx_t: bool):
        module = types.ModuleType("deep_ep")
        module.Buffer = FakeBuffer
        if with_topk_idx_t:
            module.topk_idx_t = torch.int64
        monkeypatch.setitem(sys.modules, "deep_ep", module)
        monkeypatch.setitem(sys.modules, "deep_ep_cpp", types.ModuleType("deep_ep_cpp"))
        monkeypatch.setattr(deepep, "_deep_ep", module)
        monkeypatch.setattr(deepep, "_import_error", None)
        monkeypatch.setattr(deepep, "_group_sizes", {})
        monkeypatch.setattr(deepep.dist, "get_world_size", lambda group: 2)
    return install


GROUP = object()  # a stand-in group of two ranks


def test_defective_build_refuses_narrow_rows(fake_deep_ep):
    fake_deep_ep(with_topk_idx_t=False)  # v1.2.1: no topk_idx_t
    assert not deepep.narrow_rows_fixed()
    assert "predates its fix" in deepep.unusable_reason(GROUP, hidden_size=128)
    assert deepep.unusable_reason(GROUP, hidden_size=1024) is None


def test_fixed_build_serves_narrow_rows(fake_deep_ep):
    fake_deep_ep(with_topk_idx_t=True)  # after DeepEP commit da6ca24 (and abba6ad before it)
    assert deepep.narrow_rows_fixed()
    assert deepep.unusable_reason(GROUP, hidden_size=128) is None
    assert deepep.topk_index_dtype() == torch.int64
    assert "multiple of 32" in deepep.unusable_reason(GROUP, hidden_size=120)  # SM90 TMA limit stays


def test_group_sizes_are_asked_of_deepep(fake_deep_ep):
    """The sizes come from DeepEP's own config tables (they differ across versions), not from
    a list of ours."""
    fake_deep_ep(with_topk_idx_t=True)
    assert deepep.supported_group_sizes() == (2, 4, 8, 16, 48)
    FakeBuffer.is_sm90_compiled = staticmethod(lambda: False)  # no NVSHMEM: one node only
    try:
        deepep._group_sizes.clear()
        assert deepep.supported_group_sizes() == (2, 4, 8)
    finally:
        FakeBuffer.is_sm90_compiled = staticmethod(lambda: True)


def test_agreement_path_is_chosen_by_testing_switch_and_group_size(monkeypatch):
    """The DeepEP manager agrees through symmetric memory on groups of one node (2..8 ranks)
    unless the testing switch deepep_agreement=nccl (FLEXDISPATCH_TESTING, or in-process);
    an unknown switch or value is a clear error."""
    from flexdispatch import envs
    from flexdispatch.managers import peer_headers

    monkeypatch.delenv("FLEXDISPATCH_TESTING", raising=False)
    assert [peer_headers.wanted(w) for w in (1, 2, 4, 8, 16)] == [False, True, True, True, False]
    monkeypatch.setenv("FLEXDISPATCH_TESTING", " nvlink_barrier=torch, deepep_agreement = nccl ")
    assert not peer_headers.wanted(4)
    with envs.testing_switches(deepep_agreement="peer"):  # (in-process wins over the variable)
        assert peer_headers.wanted(4)
    assert not peer_headers.wanted(4)
    monkeypatch.setenv("FLEXDISPATCH_TESTING", "deepep_agreement=gloo")
    with pytest.raises(ValueError, match="FLEXDISPATCH_TESTING: deepep_agreement is one of .'peer', 'nccl'."):
        peer_headers.wanted(4)
    monkeypatch.setenv("FLEXDISPATCH_TESTING", "agreement=nccl")
    with pytest.raises(ValueError, match="FLEXDISPATCH_TESTING: unknown testing switch 'agreement'"):
        peer_headers.wanted(4)
    with pytest.raises(ValueError, match="testing_switches: unknown testing switch 'pulls'"):
        with envs.testing_switches(pulls="staggered"):
            pass
