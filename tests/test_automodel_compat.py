"""flexdispatch as NeMo Automodel's ``token_dispatcher`` module, both API generations.

The names and signatures are compared with Automodel's own module where ``nemo-automodel`` is
installed (the ``test`` extra brings it); every behaviour Automodel's code and tests rely on
is exercised here on flexdispatch itself. The engines CI cannot run (DeepEP, UCCL-EP,
HybridEP) are driven through stand-ins of their APIs (tests/engine_standins.py); the
multi-step programs over them run in tests/test_stateful.py.
"""

import dataclasses
import importlib
import inspect
import sys
from types import SimpleNamespace
from unittest.mock import Mock

import pytest
import torch

import flexdispatch as fd
from flexdispatch.config import requested_backend
from moe_math import TOLERANCE, apply_experts, dense_layer, make_problem, rel_err

MODULE = "nemo_automodel.components.moe.megatron.token_dispatcher"
AUTOMODEL_FIELDS = ["moe_enable_deepep", "moe_permute_fusion", "moe_expert_capacity_factor", "moe_router_topk",
                    "moe_router_expert_pad_multiple", "num_moe_experts", "moe_router_dtype",
                    "moe_flex_dispatcher_backend", "moe_deepep_num_sms", "moe_hybridep_num_sms",
                    "moe_hybridep_permute_fusion", "moe_hybridep_compact_routing",
                    "moe_hybridep_num_sms_preprocessing", "moe_hybridep_num_blocks_permute",
                    "moe_hybridep_num_blocks_unpermute", "moe_share_token_dispatcher", "moe_deepep_async_dispatch",
                    "moe_benchmark_static_routing"]
"""Automodel 0.7.0's TokenDispatcherConfig fields, in order (checked against the installed
package where it is present)."""


def _automodel_module():
    """Automodel's own dispatcher module (not an alias of flexdispatch), or skip."""
    pytest.importorskip("nemo_automodel")
    aliased = sys.modules.get(MODULE)
    if aliased is fd:
        del sys.modules[MODULE]
    try:
        return importlib.import_module(MODULE)
    finally:
        if aliased is fd:
            sys.modules[MODULE] = fd


@pytest.fixture(autouse=True)
def _no_shared_managers():
    """Each test starts with nothing published (the class attributes are process-wide)."""
    fd.dispatcher.forget_shared_managers()
    yield
    fd.dispatcher.forget_shared_managers()


def _group(size=2):
    """A stand-in group object, as Automodel's tests build dispatchers with (``size()`` only)."""
    group = Mock()
    group.size.return_value = size
    return group


# ---- names and signatures ----------------------------------------------------------------------


def _parameters(func):
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values()]


def _compatible(ours, theirs) -> bool:
    """Our signature takes every call theirs takes, meaning the same: the same parameters in the
    same order and kinds, their defaults kept (ours may default what theirs requires), and any
    parameters ours adds after them optional."""
    a, b = _parameters(ours), _parameters(theirs)
    if len(a) < len(b):
        return False
    for (name, kind, default), (their_name, their_kind, their_default) in zip(a, b):
        if (name, kind) != (their_name, their_kind) or (their_default is not inspect.Parameter.empty
                                                        and default != their_default):
            return False
    return all(d is not inspect.Parameter.empty or k in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
               for _, k, d in a[len(b):])


def test_every_name_of_automodels_module_with_its_signature():
    am = _automodel_module()
    skipped = {"ABC", "List", "Literal", "Tuple", "Optional", "abstractmethod", "dataclass", "logging", "os"}
    wrong = []
    for name, theirs in vars(am).items():
        if name.startswith("__") or name in skipped:
            continue
        if not hasattr(fd, name):
            wrong.append(f"missing: {name}")
            continue
        ours = getattr(fd, name)
        if name in fd.engines.ENGINE_NAMES:  # None exactly where the engine does not import
            if (ours is None) != (theirs is None):
                wrong.append(f"{name}: {ours!r} here, {theirs!r} in Automodel")
        elif inspect.isclass(theirs) and theirs.__module__ == am.__name__:
            for attr, member in vars(theirs).items():
                if attr.startswith("__") and attr != "__init__" or attr == "_abc_impl":
                    continue
                if not hasattr(ours, attr):
                    wrong.append(f"missing: {name}.{attr}")
                elif (inspect.isfunction(member) and (attr != "__init__" or not dataclasses.is_dataclass(theirs))
                      and not _compatible(getattr(ours, attr), member)):
                    wrong.append(f"{name}.{attr}{inspect.signature(getattr(ours, attr))}, Automodel's "
                                 f"{inspect.signature(member)}")
        elif inspect.isfunction(theirs) and theirs.__module__.startswith("nemo_automodel"):
            if not _compatible(ours, theirs):
                wrong.append(f"{name}{inspect.signature(ours)}, Automodel's {inspect.signature(theirs)}")
        elif not callable(theirs) and not inspect.ismodule(theirs) and ours != theirs:
            wrong.append(f"{name} = {ours!r}, Automodel's {theirs!r}")
    assert not wrong, "\n".join(wrong)


def test_config_classes_of_both_generations():
    fields = [f.name for f in dataclasses.fields(fd.TokenDispatcherConfig)]
    assert fields[:len(AUTOMODEL_FIELDS)] == AUTOMODEL_FIELDS
    try:
        am = _automodel_module()
    except pytest.skip.Exception:
        am = None
    if am is not None:
        theirs = dataclasses.fields(am.TokenDispatcherConfig)
        assert [(f.name, f.default) for f in theirs] == [(f.name, f.default) for f in
                                                        dataclasses.fields(fd.TokenDispatcherConfig)][:len(theirs)]
    # The first generation's seven fields, its defaults, and every new field accepted by both.
    old = fd.MoEConfig(True, False, None, 3, None, 16, "fp32", "alltoall")
    assert (old.moe_router_topk, old.num_moe_experts, old.moe_flex_dispatcher_backend) == (3, 16, "alltoall")
    assert fd.MoEConfig().moe_flex_dispatcher_backend is None and fd.MoEConfig().moe_deepep_async_dispatch
    new = fd.TokenDispatcherConfig()
    assert new.moe_flex_dispatcher_backend == "deepep" and not new.moe_deepep_async_dispatch
    assert fd.TokenDispatcherConfig(moe_flex_backend="nvlink", moe_sync_free=True).moe_sync_free
    with pytest.raises(ValueError, match="moe_flex_dispatcher_backend"):
        fd.TokenDispatcherConfig(moe_flex_dispatcher_backend="nccl")
    with pytest.raises(ValueError, match="moe_hybridep_num_sms"):
        fd.TokenDispatcherConfig(moe_hybridep_num_sms=0)


def test_which_backend_field_wins(monkeypatch):
    monkeypatch.delenv("FLEXDISPATCH_BACKEND", raising=False)
    assert requested_backend(fd.TokenDispatcherConfig()) == ("deepep", "config.moe_flex_dispatcher_backend")
    assert requested_backend(fd.MoEConfig()) == ("auto", "config.moe_flex_backend")
    assert requested_backend(fd.TokenDispatcherConfig(moe_flex_backend="alltoall"))[0] == "alltoall"
    assert requested_backend(fd.MoEConfig(moe_flex_dispatcher_backend="hybridep"))[0] == "hybridep"
    monkeypatch.setenv("FLEXDISPATCH_BACKEND", "local")
    assert requested_backend(fd.TokenDispatcherConfig(moe_flex_backend="alltoall")) == ("local", "FLEXDISPATCH_BACKEND")
    d = fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], fd.TokenDispatcherConfig(num_moe_experts=4), None)
    assert d.backend == "local"  # (the config names DeepEP; the environment overrides it)
    monkeypatch.setenv("FLEXDISPATCH_BACKEND", "mpi")
    with pytest.raises(ValueError, match="FLEXDISPATCH_BACKEND: expected one of"):
        fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], fd.TokenDispatcherConfig(num_moe_experts=4), None)


def test_metadata_getter_either_spelling():
    class Base(fd._DispatchManager):
        def setup_metadata(self, *a): pass
        def dispatch(self, h, *a): return h
        def combine(self, h, *a): return h
        def get_permuted_hidden_states_by_experts(self, h): return h
        def get_restored_hidden_states_by_experts(self, h): return h

    class New(Base):
        def get_dispatched_metadata(self):
            return "meta"

    class Old(Base):
        def get_dispached_metadata(self):
            return "old"

    assert New().get_dispatched_metadata() == New().get_dispached_metadata() == "meta"
    assert Old().get_dispatched_metadata() == "old"
    with pytest.raises(TypeError):
        Base()


# ---- the engines Automodel names -----------------------------------------------------------------


@pytest.mark.skipif(fd.deepep_available()[0], reason="deep_ep is installed here")
def test_missing_engine_raises_importerror_as_automodel():
    with pytest.raises(ImportError):
        fd._DeepepManager(group=_group(), router_topk=2)
    for backend in ("deepep", "uccl_ep", "hybridep"):
        cfg = fd.TokenDispatcherConfig(num_moe_experts=8, moe_flex_dispatcher_backend=backend)
        with pytest.raises(ImportError, match=f"moe_flex_dispatcher_backend='{backend}'") as caught:
            fd.MoEFlexTokenDispatcher(4, list(range(4)), cfg, _group())
        assert isinstance(caught.value, ValueError)  # (as for an explicit backend that cannot serve)
    with pytest.raises(ImportError, match="HybridEP is not installed"):
        fd._HybridEPManager(group=None, num_local_experts=2, num_experts=8, router_topk=2)


def test_deepep_manager_takes_an_engine_through_hooks():
    dispatch_fn, combine_fn = Mock(), Mock()
    m = fd._DeepepManager(_group(), 2, False, None, None, None, None, None, dispatch_fn, combine_fn)
    assert m._fused_dispatch is dispatch_fn and m._fused_combine is combine_fn
    m = fd._DeepepManager(group=_group(), router_topk=2, _dispatch_fn=dispatch_fn, _combine_fn=combine_fn)
    assert m._fused_dispatch is dispatch_fn
    with pytest.raises(ValueError, match="num_experts"):  # built without an expert count: no step runs
        m.setup_metadata(4, torch.rand(4, 8))
    with pytest.raises(ValueError, match="sync_free: not available through an engine"):
        fd._DeepepManager(_group(), 2, num_experts=8, _dispatch_fn=dispatch_fn, _combine_fn=combine_fn,
                          sync_free=True)


def test_engines_resolve_lazily_and_follow_patches(monkeypatch):
    import engine_standins

    assert "fused_dispatch" not in vars(fd)  # resolved at access, not at import
    monkeypatch.setattr(fd, "uccl_fused_dispatch", engine_standins.fused_dispatch, raising=False)
    monkeypatch.setattr(fd, "uccl_fused_combine", engine_standins.fused_combine, raising=False)
    cfg = fd.TokenDispatcherConfig(num_moe_experts=8, moe_flex_dispatcher_backend="uccl_ep")
    d = fd.MoEFlexTokenDispatcher(4, list(range(4)), cfg, _group())
    assert d._comm_manager._fused_dispatch is engine_standins.fused_dispatch and d.backend == "uccl_ep"
    assert fd.MoEFlexTokenDispatcher.shared_uccl_manager is d._comm_manager
    assert fd.MoEFlexTokenDispatcher.shared_deepep_manager is None


def test_hybridep_manager_of_automodel(monkeypatch):
    monkeypatch.setattr(fd, "hybrid_ep_dispatch", lambda *a, **k: None, raising=False)
    m = fd._HybridEPManager(group=None, num_local_experts=2, num_experts=8, router_topk=2)
    routing, probs = m._indices_to_multihot(torch.tensor([[0, 3], [1, -1]]), torch.tensor([[0.6, 0.4], [0.7, 0.0]]))
    assert routing.dtype == torch.bool and routing.sum() == 3 and bool(routing[0, 3]) and bool(routing[1, 1])
    assert probs.dtype == torch.float32 and float(probs[0, 3]) == pytest.approx(0.4)
    for compact in (False, True):
        processor = fd._HybridEPMetadataProcessor(num_experts=8, permute_fusion=False, compact_routing=compact)
        indices = torch.tensor([[0, 3], [1, -1]])
        out_routing, out_probs = processor(indices, torch.tensor([[0.6, 0.4], [0.7, 0.0]]))
        assert out_routing is indices if compact else torch.equal(out_routing, routing)
        assert torch.equal(out_probs, probs)
    with pytest.raises(ValueError, match="out of range"):  # (Automodel's conversion indexes out of bounds)
        m._indices_to_multihot(torch.tensor([[0, 9]]), torch.ones(1, 2))
    cap = fd.HybridEPPipelineRuntimeInitializer.required_capacity
    assert (cap(1), cap(513), cap(1000)) == (512, 576, 1024)


# ---- the dispatcher's generation-dependent behaviour ---------------------------------------------


@pytest.mark.parametrize("enabled", [False, True])
def test_one_call_combine_follows_the_config(enabled):
    """Automodel's own check, on a dispatcher and manager built without their constructors."""
    dispatcher = object.__new__(fd.MoEFlexTokenDispatcher)
    manager = object.__new__(fd._DeepepManager)
    manager.get_restored_hidden_states_by_experts = Mock(side_effect=lambda tensor: tensor)
    manager.combine = Mock(side_effect=lambda tensor, async_finish, allocate_on_comm_stream: tensor)
    dispatcher._comm_manager = manager
    dispatcher.config = SimpleNamespace(moe_deepep_async_dispatch=enabled)
    dispatcher.hidden_shape = (2, 4)
    hidden = torch.randn(2, 4)
    torch.testing.assert_close(dispatcher.token_unpermutation(hidden), hidden)
    manager.combine.assert_called_once_with(hidden, enabled, enabled)


@pytest.mark.parametrize("config_class,async_", [(fd.MoEConfig, True), (fd.TokenDispatcherConfig, False)])
def test_one_call_flags_by_generation(config_class, async_):
    cfg = config_class(num_moe_experts=4, moe_router_topk=2, moe_flex_dispatcher_backend="local")
    d = fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], cfg, None)
    seen = []
    manager = d._comm_manager
    dispatch, combine = manager.dispatch, manager.combine
    manager.dispatch = lambda h, a, b, **k: (seen.append(("dispatch", a, b)), dispatch(h, a, b, **k))[1]
    manager.combine = lambda h, a, b: (seen.append(("combine", a, b)), combine(h, a, b))[1]
    tokens, _, probs = d.token_permutation(torch.randn(6, 8), 6, torch.rand(6, 4))
    d.token_unpermutation(tokens * probs[:, None])
    assert seen == [("dispatch", async_, async_), ("combine", async_, async_)]


class _PlainManager(fd._DispatchManager):
    """A manager written against the reference's protocol only (attributes, no flexdispatch API),
    for one rank: routing by top-k, permutation by boolean masks, restore by index_add."""

    def __init__(self, num_experts, topk):
        self.num_experts, self.topk = num_experts, topk
        self.token_probs = self.token_indices = None

    def setup_metadata(self, num_local_tokens, probs):
        self.token_probs, self.token_indices = torch.topk(probs.reshape(num_local_tokens, -1), self.topk, dim=-1)

    def dispatch(self, hidden_states, async_finish=False, allocate_on_comm_stream=False):
        self.dispatched_probs = self.token_probs
        return hidden_states

    def get_dispatched_metadata(self):
        return self.token_indices, self.dispatched_probs

    def get_permuted_hidden_states_by_experts(self, hidden_states):
        rows, probs, self.tokens_per_expert = [], [], []
        for e in range(self.num_experts):
            hit = (self.token_indices == e)
            rows.append(hit.any(1).nonzero().flatten())
            probs.append(self.token_probs[hit])
            self.tokens_per_expert.append(len(rows[-1]))
        self.rows, self.rows_in = torch.cat(rows), hidden_states.shape[0]
        self.tokens_per_expert = torch.tensor(self.tokens_per_expert)
        return hidden_states[self.rows], torch.cat(probs)

    def get_number_of_tokens_per_expert(self):
        return self.tokens_per_expert

    def get_restored_hidden_states_by_experts(self, hidden_states):
        return hidden_states.new_zeros(self.rows_in, hidden_states.shape[1]).index_add(0, self.rows, hidden_states)

    def combine(self, hidden_states, async_finish=False, allocate_on_comm_stream=False):
        return hidden_states


@pytest.mark.parametrize("entry", ["probs", "indices"])
def test_assigned_comm_manager_is_used(entry):
    """``_comm_manager`` is assignable, and a manager of the reference's kind runs the layer."""
    xs, logits, weights = make_problem(3, [21], 8, 4)
    d = fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], fd.TokenDispatcherConfig(num_moe_experts=4,
                                                                            moe_flex_dispatcher_backend="local"))
    d._comm_manager = _PlainManager(4, 2)
    probs = torch.softmax(logits[0], -1)
    token_probs, token_indices = torch.topk(probs, 2)
    if entry == "probs":
        tokens, tpe, pprobs = d.token_permutation(xs[0].reshape(3, 7, 8), 21, probs)
    else:
        tokens, tpe, pprobs = d.token_permutation2(xs[0].reshape(3, 7, 8), 21, token_probs, token_indices)
    out = d.token_unpermutation(apply_experts(tokens, tpe, pprobs, weights))
    assert out.shape == (3, 7, 8)
    assert rel_err(out.reshape(21, 8), dense_layer(xs[0], token_probs, token_indices, weights)) < 1e-12


# ---- shared managers -----------------------------------------------------------------------------


def _local_dispatcher(share=True, **fields):
    cfg = fd.TokenDispatcherConfig(num_moe_experts=4, moe_router_topk=2, moe_flex_dispatcher_backend="local",
                                   moe_share_token_dispatcher=share, **fields)
    return fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], cfg, None)


def test_shared_manager_keeps_each_layers_calls_apart():
    a, b = _local_dispatcher(), _local_dispatcher()
    assert a._comm_manager is b._comm_manager is fd.MoEFlexTokenDispatcher.shared_comm_manager
    assert _local_dispatcher(moe_router_expert_pad_multiple=2)._comm_manager is not a._comm_manager  # other settings
    assert _local_dispatcher(share=False)._comm_manager is not a._comm_manager
    xs, logits, weights = make_problem(5, [13, 9], 8, 4)
    routes = [torch.topk(torch.softmax(l, -1), 2) for l in logits]
    # Both layers in flight at once, closed in the reverse order, twice (the second time the
    # manager serves them in the other order).
    for order in ((0, 1), (1, 0)):
        layers = (a, b) if order == (0, 1) else (b, a)
        permuted = [d.token_permutation2(xs[i], xs[i].shape[0], *routes[i]) for d, i in zip(layers, order)]
        outs = [None, None]
        for k in (1, 0):
            tokens, tpe, pprobs = permuted[k]
            outs[k] = layers[k].token_unpermutation(apply_experts(tokens, tpe, pprobs, weights))
        for k, i in enumerate(order):
            want = dense_layer(xs[i], routes[i][0], routes[i][1], weights)
            assert rel_err(outs[k], want) < TOLERANCE[torch.float32]
    del a, layers
    import gc

    gc.collect()  # a collected dispatcher's state is dropped from the shared manager
    assert len(b._comm_manager._aside) == 0


def test_shutdown_unpublishes_shared_managers():
    d = _local_dispatcher()
    assert fd.MoEFlexTokenDispatcher.shared_comm_manager is d._comm_manager
    fd.shutdown()
    assert fd.MoEFlexTokenDispatcher.shared_comm_manager is None


# ---- Automodel's own MoE module over flexdispatch ----------------------------------------------


@pytest.mark.timeout(900)
@pytest.mark.parametrize("world,backends", [(1, ("auto",)), (2, ("auto", "nvlink", "uccl_ep", "hybridep", "uccl_ep+env"))])
def test_automodel_moe_module_matches_dense(world, backends):
    """Automodel's GroupedExpertsDeepEP (its own code, with its token_dispatcher aliased to
    flexdispatch) forward and backward over several steps, against the dense float64 layer.
    Only the expert math is replaced (torch._grouped_mm has no CPU backward); the engines named
    "uccl_ep" and "hybridep" run on their stand-ins; "uccl_ep+env" is the README's recipe for
    machines without an engine (dispatcher uccl_ep, FLEXDISPATCH_BACKEND=auto)."""
    pytest.importorskip("nemo_automodel")
    from dist_pool import DistPool

    pool = DistPool(world)
    try:
        for backend in backends:
            for res in pool.run("automodel_moe_module", timeout=500, backend=backend, steps=4):
                assert sorted(res["errors"]) == [0, 1, 2, 3], (backend, res)  # every step compared
                assert res["dispatcher"] == {"auto": "local" if world == 1 else "alltoall",
                                             "uccl_ep+env": "alltoall"}.get(backend, backend)
                assert max(res["errors"].values()) < 1e-5, (backend, res["errors"])
                if backend in ("uccl_ep", "hybridep"):
                    assert res["engine_calls"] > 0, backend
    finally:
        pool.close()
