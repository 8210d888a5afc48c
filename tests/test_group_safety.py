"""A process group used safely on gloo: nothing of flexdispatch keeps a destroyed group alive
(gloo aborted processes at exit when something did), two threads calling dispatchers of one
group at once raise on every rank instead of hanging or crashing, and a peer that is alive but
stuck is reported within FLEXDISPATCH_PEER_TIMEOUT_S, naming it, instead of holding the others
for gloo's 30 minutes. Each scenario runs on a group of its own (the pool's stays usable)."""

import pytest

from dist_pool import DistPool


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()
    assert [q.exitcode for q in p.procs] == [0, 0], "a rank did not exit cleanly"


def check_nothing_holds_a_destroyed_group(pool, backend, timeout=60, **kwargs):
    """Every rank: the destroyed group is not referenced by flexdispatch, the dispatcher's group
    is gone, and a later call raises GroupDestroyedError. Shared with the NCCL suite."""
    for rank, result in enumerate(pool.run("nothing_holds_a_destroyed_group", timeout=timeout, backend=backend,
                                           **kwargs)):
        assert not result["alive"], f"rank {rank}: the destroyed group is still held by {result['holders']}"
        assert result["group_attr_none"], rank
        assert (result["after"] or "").startswith("GroupDestroyedError: the expert-parallel process group of this "
                                                  "dispatcher was destroyed"), (rank, result["after"])


def check_two_threads_raise_on_every_rank(pool, backend, timeout=60, **kwargs):
    """Two threads driving two layers of one group: the second raises before any collective, the
    first raises in its next exchange on every rank, later calls raise until shutdown().
    Shared with the NCCL suite."""
    for rank, result in enumerate(pool.run("two_threads_one_group", timeout=timeout, backend=backend, **kwargs)):
        a, b = result["errors"]["a"], result["errors"]["b"]
        # B called while A was inside a call: it raised before any collective, every time.
        assert all(e and e.startswith("ConcurrentCallError: threads: thread 'layer-b' called") and
                   "while thread 'layer-a' was inside a call" in e for e in b), (rank, b)
        # A's call carried it in its next exchange (every rank raised there), then every call
        # raised at once.
        assert a[0].startswith("ConcurrentCallError: threads: on this rank thread 'layer-b'") and \
            "every rank of the expert-parallel group raises" in a[0], (rank, a)
        assert all("until flexdispatch.shutdown()" in e for e in a[1:]), (rank, a)
        assert result["recovered"], rank


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
def test_nothing_keeps_a_destroyed_group_alive(pool, backend):
    """Neither the dispatcher nor its manager keeps the group past destroy_process_group, and a
    later call raises instead of running on the destroyed group (silently, or failing inside
    torch)."""
    check_nothing_holds_a_destroyed_group(pool, backend)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
def test_two_threads_on_one_group_raise_on_every_rank(pool, backend):
    """Unguarded, both threads would enter collectives of one group at once (a hang or a crash:
    the pool's timeout fails the test)."""
    check_two_threads_raise_on_every_rank(pool, backend)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
def test_a_stuck_peer_is_named_within_the_peer_timeout(pool, backend):
    """Rank 1 sleeps in its experts for the timeout + 2 s; rank 0's combine gives up after the
    timeout, naming rank 1 and the call; rank 1's late combine fails at once (gloo closed the
    group's connections). Without the bound rank 0 waits for rank 1 (no error)."""
    timeout = 2.0
    stuck_out, late = pool.run("stuck_peer_times_out", timeout=60, backend=backend, timeout_s=timeout)
    error = stuck_out["error"] or ""
    assert error.startswith("PeerTimeoutError: ") and "step 0 of this layer, combine" in error, error
    assert f"rank(s) [1] of the expert-parallel group did not arrive within {timeout:g} s " \
           f"(FLEXDISPATCH_PEER_TIMEOUT_S); rank 0 gives up" in error, error
    assert timeout - 0.1 <= stuck_out["waited"] <= timeout + 3, stuck_out["waited"]
    assert "the group's connections were closed" in (late["error"] or "") and late["waited"] < 2, late


def test_an_exchange_of_nothing_returns_nothing_on_every_rank(pool):
    for rank, result in enumerate(pool.run("empty_gather_exchange", timeout=60)):
        assert result == {"headers": None, "tables": [], "error": None}, (rank, result)
