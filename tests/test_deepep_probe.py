"""Which DeepEP builds get narrow rows, decided without a GPU (a stand-in deep_ep module)."""

import sys
import types

import pytest
import torch

from flexdispatch.managers import deepep


class FakeBuffer:
    @staticmethod
    def is_sm90_compiled():
        return True


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
