"""The stateful, multi-step test (tests/stateful.py) on every manager CI can run: the local
manager in this process, and the all-to-all and NVLink managers over gloo at EP 2, 3 and 4.
The local and all-to-all managers run at least 1000 steps per CI run, the NVLink manager 540
per EP size; ``FLEXDISPATCH_STATEFUL_SEED`` replays one program and
``FLEXDISPATCH_STATEFUL_PROGRAMS`` runs more of them."""

import os

import pytest

import stateful
from dist_pool import DistPool

STEPS = 60
PROGRAMS = int(os.environ.get("FLEXDISPATCH_STATEFUL_PROGRAMS", "17"))  # 17 * 60 = 1020 steps a manager
# The NVLink manager's programs (its gather transport all-gathers every part; half its layers
# sync-free, at the worst-case sizes) cost about twice the all-to-all's: 9 * 60 = 540 steps an
# EP size keep CI under 20 minutes on two cores (FLEXDISPATCH_STATEFUL_PROGRAMS raises both).
NVLINK_PROGRAMS = max(9, PROGRAMS - 8)
GPU_PROGRAMS = 6
# Programs on the engine stand-ins (DeepEP's and UCCL-EP's API through the DeepEP manager's
# hooks, HybridEP's buffer) and with two layers sharing one manager, per EP size.
ENGINE_PROGRAMS = max(2, PROGRAMS - 15)


def seeds(world: int) -> list[int]:
    replay = os.environ.get("FLEXDISPATCH_STATEFUL_SEED")
    if replay:
        return [int(replay)]
    return [1000 * world + i for i in range(PROGRAMS)]


def test_stateful_local_manager():
    total = 0
    for i, seed in enumerate(seeds(1)):
        # (a third of the programs with layers 0 and 1 sharing one manager)
        program = stateful.generate_program(seed, 1, STEPS, sync_free=True, shared=i % 3 == 2)
        total += stateful.Runner(program, 0, None).run()["steps"]
    assert total >= STEPS * len(seeds(1))


@pytest.mark.gpu
def test_stateful_local_manager_on_one_gpu():
    """The local manager's programs on one GPU, and a bad route raised at the next sync point:
    with a few dozen tokens a call, the sync-free calls take the one-launch permutation; with up
    to 4096 tokens of 256 or more values, many take the plan's passes and the scatter whose tail
    blocks store the error word."""
    total = 0
    for i, seed in enumerate(seeds(1)[:GPU_PROGRAMS]):
        large = dict(max_tokens=4096, hidden_sizes=(256, 384)) if i % 2 else {}
        program = stateful.generate_program(seed, 1, STEPS, sync_free=True, shared=i % 3 == 2, **large)
        total += stateful.Runner(program, 0, None, device="cuda").run()["steps"]
    assert total >= STEPS * len(seeds(1)[:GPU_PROGRAMS])


@pytest.mark.gpu
def test_stateful_local_manager_in_a_green_context(green_context):
    """Two of those programs in a green context of 16 multiprocessors, where the driver refuses
    the grid launch that the device's 132 (or however many) would hold: every call whose route
    the grid would serve counts the whole route in each block instead, with the same results."""
    total = 0
    with green_context(16):
        for seed in seeds(1)[:2]:
            program = stateful.generate_program(seed, 1, STEPS, sync_free=True)
            total += stateful.Runner(program, 0, None, device="cuda").run()["steps"]
    assert total >= STEPS * len(seeds(1)[:2])


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def pool(request):
    p = DistPool(request.param)
    yield p
    p.close()


def check_agreed(results) -> int:
    """Every rank ran every step and raised at the same steps; returns the steps run."""
    first = results[0]
    for rank, res in enumerate(results):
        for a, b in zip(res, first):
            assert a["raised_at"] == b["raised_at"], (
                f"seed {a['seed']}: rank {rank} raised at steps {a['raised_at']}, rank 0 at {b['raised_at']}. "
                f"Replay: FLEXDISPATCH_STATEFUL_SEED={a['seed']}")
            assert a["checks"] > 0
    return sum(r["steps"] for r in first)


@pytest.mark.timeout(900)
def test_stateful_alltoall_gloo(pool):
    results = pool.run("stateful_programs", timeout=600, seeds=seeds(pool.world), steps=STEPS)
    assert check_agreed(results) >= STEPS * len(seeds(pool.world))


@pytest.mark.timeout(900)
def test_stateful_nvlink_gloo(pool):
    """The NVLink manager's algorithm (its peer buffers emulated with all-gathers on gloo),
    half its layers sync-free (bounded or not)."""
    chosen = seeds(pool.world)[:NVLINK_PROGRAMS]
    results = pool.run("stateful_programs", timeout=600, seeds=chosen, steps=STEPS, backend="nvlink", sync_free=True)
    assert check_agreed(results) >= STEPS * len(chosen)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["deepep", "uccl_ep", "hybridep"])
def test_stateful_engine_standins_gloo(pool, engine):
    """The engines Automodel names, on stand-ins of their APIs (tests/engine_standins.py): the
    DeepEP manager's hook path (``_dispatch_fn`` / ``_combine_fn``, as UCCL-EP plugs in) and the
    HybridEP manager (group-wide padding, its header exchange), every step against the dense
    formula, bad inputs on one rank raised by every rank."""
    chosen = seeds(pool.world)[:ENGINE_PROGRAMS]
    results = pool.run("stateful_programs", timeout=600, seeds=chosen, steps=STEPS, engine=engine)
    assert check_agreed(results) >= STEPS * len(chosen)
    assert all(r["engine_calls"] for rank in results for r in rank), "the engine was not called"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
def test_stateful_shared_managers_gloo(pool, backend):
    """Layers 0 and 1 of the same settings share one manager (moe_share_token_dispatcher), and
    "pair" steps keep both in flight, closed in either order."""
    chosen = seeds(pool.world)[:ENGINE_PROGRAMS]
    results = pool.run("stateful_programs", timeout=600, seeds=chosen, steps=STEPS, backend=backend, shared=True)
    assert check_agreed(results) >= STEPS * len(chosen)


def test_tokens_per_expert_of_every_call():
    """The repro of the stale-counts defect: the second call's counts are its own."""
    import torch
    import flexdispatch as fd

    d = fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], fd.MoEConfig(num_moe_experts=4, moe_router_topk=1))
    seen = []
    for expert in (0, 3, 3, 1):
        tokens, tpe, _ = d.token_permutation2(torch.ones(6, 2), 6, torch.ones(6, 1), torch.full((6, 1), expert))
        seen.append(tpe.tolist())
        d.token_unpermutation(tokens)
    assert seen == [[6, 0, 0, 0], [0, 0, 0, 6], [0, 0, 0, 6], [0, 6, 0, 0]]
