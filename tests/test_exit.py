"""Processes exit cleanly after gloo runs: a launcher marks a job failed when a rank aborts at
exit ("terminate called without an active exception").

torch's gloo group aborts at exit when an object still holds it past destroy_process_group:
flexdispatch holds groups by weak reference, and destroys at exit a gloo group the application
left undestroyed (docs/DESIGN.md, "Exit"; tests/exit_jobs.py counts the aborts of many jobs).
The mechanism is tested deterministically in test_group_safety.py (nothing keeps a destroyed
group alive); this test checks the outcome, on fresh interpreters as a launcher starts them.

Statistics: a job costs two interpreter starts (about 3 s of CPU), so CI runs 18 jobs, 3 of
each pattern, one at a time (50-60 s; two at a time take as long on two cores, and make aborts
rarer). It fails at the first abort: an abort rate of 1 job in 3 (about what a group held past
destroy_process_group gives, one job at a time) passes unnoticed with probability below 0.1%,
one of 1 job in 10 with 15%; a small rate r fails it with probability about 18 r. 0 aborts in
18 jobs alone bound the rate below 15%.
"""

import pytest

import exit_jobs

PATTERNS = tuple(p for p in exit_jobs.PATTERNS if not p.startswith("torch_"))  # (torch_*: plain torch, no flexdispatch)


@pytest.mark.timeout(300)
def test_gloo_ranks_exit_without_abort():
    results = exit_jobs.count(PATTERNS, jobs=3)
    aborted = {p: whats for p, (n, _, whats) in results.items() if n}
    assert not aborted, f"jobs aborted at exit: {aborted}"
