"""A process group used safely on gloo: nothing of flexdispatch keeps a destroyed group alive
(gloo aborted processes at exit when something did). Each scenario runs on a group of its own
(the pool's stays usable)."""

import pytest

from dist_pool import DistPool


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    yield p
    p.close()
    assert [q.exitcode for q in p.procs] == [0, 0], "a rank did not exit cleanly"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
def test_nothing_keeps_a_destroyed_group_alive(pool, backend):
    """Before: the dispatcher (and its manager) kept the group past destroy_process_group, and a
    later call ran on the destroyed group, silently or failing inside torch."""
    for rank, result in enumerate(pool.run("nothing_holds_a_destroyed_group", timeout=60, backend=backend)):
        assert not result["alive"], f"rank {rank}: the destroyed group is still held by {result['holders']}"
        assert result["group_attr_none"], rank
        assert (result["after"] or "").startswith("GroupDestroyedError: the expert-parallel process group of this "
                                                  "dispatcher was destroyed"), (rank, result["after"])
