"""Core placement rules (capibara6/workers/placement.py) and the token frame (framing.py)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

from capibara6 import threads
from capibara6.types import TokenEvent
from capibara6.workers.framing import decode, encode, encode_token
from capibara6.workers.placement import Placement, first_cpu, numa_nodes, parse_cpulist
from capibara6.workers.proxy import _Relays


def test_workers_get_disjoint_sets_and_a_cpu_is_kept_for_http() -> None:
    p = Placement(list(range(8)), nodes=[])
    a, b = p.assign("a", 3), p.assign("b", 3)
    assert set(a).isdisjoint(b) and len(a) == len(b) == 3
    assert p.http_cpu == 7 and 7 not in a + b


def test_two_cores_give_one_to_each_worker() -> None:
    p = Placement([0, 1], nodes=[])
    assert p.http_cpu is None
    assert {p.assign("a", 1), p.assign("b", 1)} == {(0,), (1,)}


def test_a_worker_stays_inside_one_numa_node() -> None:
    p = Placement(list(range(16)), nodes=[list(range(8)), list(range(8, 16))])
    a, b = p.assign("a", 4), p.assign("b", 4)
    assert set(a) <= set(range(8)) or set(a) <= set(range(8, 16))
    assert set(b) <= set(range(8)) or set(b) <= set(range(8, 16))
    assert set(a).isdisjoint(b)


def test_released_cpus_are_given_again_and_oversubscription_shares_least_used() -> None:
    p = Placement([0, 1], nodes=[])
    p.assign("a", 1)
    p.assign("b", 1)
    shared = p.assign("c", 1)
    assert shared in {(0,), (1,)}
    p.release("a")
    p.release("c")
    assert p.assign("d", 1) != p.given["b"]


def test_each_server_starts_at_its_own_cpu_and_goes_round() -> None:
    """Servers sharing a box spread their workers: the start follows the pid (`first_cpu`)."""
    assert [first_cpu(4, salt=pid) for pid in (100, 101, 102, 103, 104)] == [0, 1, 2, 3, 0]
    assert first_cpu(1, salt=12345) == 0
    p = Placement(list(range(8)), nodes=[], start=5)  # CPU 7 is for HTTP: workers get 0-6
    assert [p.assign(k, 1) for k in "abc"] == [(5,), (6,), (0,)]
    assert p.assign("d", 3) == (1, 2, 3) and p.describe()["first_cpu"] == 5
    two = [Placement([0, 1], nodes=[], start=k).assign("a", 1) for k in (0, 1)]
    assert two == [(0,), (1,)]  # two servers on a 2-CPU box: not both on CPU 0
    # with NUMA nodes, still a node whole: the start picks the node, then goes round inside it
    q = Placement(list(range(17)), nodes=[list(range(8)), list(range(8, 16))], start=10)
    assert q.assign("a", 4) == (10, 11, 12, 13) and set(q.assign("b", 4)) <= set(range(8))
    assert Placement([0, 1]).describe()["first_cpu"] == [0, 1][os.getpid() % 2]


def test_the_servers_cpus_are_its_mask_at_start_not_a_pinned_threads() -> None:
    """threads.server_cpus (what `n_threads: auto`, placement and the relays count) reads the mask
    once, from the main thread: a thread pinned to one CPU (a relaying one) still counts them all."""
    allowed = sorted(os.sched_getaffinity(0))
    saved = threads._server_cpus
    threads._server_cpus = None
    try:
        seen: list[tuple[list[int], int, list[int]]] = []

        def pinned_thread() -> None:
            os.sched_setaffinity(0, {allowed[-1]})
            seen.append((threads.server_cpus(), threads.usable_cpus(), Placement(nodes=[]).cpus + [Placement(nodes=[]).http_cpu]))

        t = threading.Thread(target=pinned_thread)
        t.start()
        t.join()
        cpus, usable, placed = seen[0]
        assert cpus == allowed
        limit = threads._cgroup_cpu_limit()
        assert usable == (min(len(allowed), limit) if limit else len(allowed))
        assert sorted(c for c in placed if c is not None) == allowed
        os.sched_setaffinity(0, {allowed[0]})  # read once: a later change of this thread's mask
        try:  # does not move it
            assert threads.server_cpus() == allowed
        finally:
            os.sched_setaffinity(0, allowed)
    finally:
        threads._server_cpus = saved


def test_numa_nodes_read_from_sysfs(tmp_path: Path) -> None:
    for i, cpus in enumerate(["0-3", "4-5,7"]):
        (tmp_path / f"node{i}").mkdir()
        (tmp_path / f"node{i}" / "cpulist").write_text(cpus + "\n")
    assert numa_nodes(tmp_path) == [[0, 1, 2, 3], [4, 5, 7]]
    assert parse_cpulist("0-2,9") == [0, 1, 2, 9]


def test_token_frames_round_trip() -> None:
    plain = TokenEvent(42, "héllo")
    frame = encode_token(7, plain)
    assert frame[:1] == b"t" and len(frame) == 1 + 8 + len("héllo".encode())
    assert decode(frame) == ("tok", 7, plain)
    rich = TokenEvent(3, "x", logprob=-0.5, top_logprobs={"x": -0.5}, piece="x")
    assert decode(encode_token(9, rich)) == ("tok", 9, rich)
    assert decode(encode("gen", 5, {"a": 1})) == ("gen", 5, {"a": 1})


def test_errors_with_their_own_constructors_cross_as_themselves() -> None:
    import pickle

    from capibara6.types import ContextLengthExceeded
    from capibara6.workers.framing import pack_error, unpack_error

    err = ContextLengthExceeded(902, 200, 1024)
    back = unpack_error(pickle.loads(pickle.dumps(pack_error(err))))
    assert type(back) is ContextLengthExceeded and str(back) == str(err) and vars(back) == vars(err)


def _in_thread(fn):  # type: ignore[no-untyped-def]
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_relaying_threads_stay_off_the_workers_cpus_while_free_ones_exist() -> None:
    """With a CPU no worker holds, a relaying stream's threads move there; with none (the workers
    hold every CPU, as one worker does on a 1-CPU server) they stay anywhere."""
    allowed = sorted(os.sched_getaffinity(0))
    relays = _Relays()
    if len(allowed) == 1:  # no free CPU can exist: what such a server does is the second case
        only = SimpleNamespace(cpus=tuple(allowed))
        relays.hold(only, threading.get_native_id())  # type: ignore[arg-type]
        try:
            assert _in_thread(relays.pin_caller) is None and os.sched_getaffinity(0) == set(allowed)
        finally:
            relays.release(only)  # type: ignore[arg-type]
        return
    tid: list[int] = []
    go, done = threading.Event(), threading.Event()

    def reader() -> None:  # stands for a worker's reader thread
        tid.append(threading.get_native_id())
        go.set()
        done.wait(10)

    def stream() -> tuple[bool, set[int], set[int]]:  # a stream's consuming thread, while it streams
        before = os.sched_getaffinity(0)
        pinned = relays.pin_caller()
        during, loop = os.sched_getaffinity(0), os.sched_getaffinity(os.getpid())
        relays.unpin_caller(pinned)
        return os.sched_getaffinity(0) == before, during, loop

    t = threading.Thread(target=reader)
    t.start()
    go.wait(10)
    a, b = SimpleNamespace(cpus=(allowed[0],)), SimpleNamespace(cpus=tuple(allowed[1:]))
    try:
        relays.hold(a, tid[0])  # type: ignore[arg-type]
        assert os.sched_getaffinity(tid[0]) == set(allowed)  # no stream relaying: anywhere
        # while a stream relays: its thread (here the main one) and the readers
        pinned = relays.pin_caller()
        assert os.sched_getaffinity(0) == set(allowed[1:])
        assert os.sched_getaffinity(tid[0]) == set(allowed[1:])
        assert _in_thread(stream) == (True, set(allowed[1:]), set(allowed[1:]))
        relays.hold(b, tid[0])  # type: ignore[arg-type]  # the workers now hold every CPU: anywhere, as before
        assert os.sched_getaffinity(tid[0]) == set(allowed)
        assert _in_thread(relays.pin_caller) is None
        relays.release(b)  # type: ignore[arg-type]
        assert os.sched_getaffinity(tid[0]) == set(allowed[1:])
        relays.unpin_caller(pinned)
        assert os.sched_getaffinity(tid[0]) == set(allowed)
        assert os.sched_getaffinity(os.getpid()) == set(allowed)
        relays.release(a)  # type: ignore[arg-type]
    finally:
        done.set()
        t.join()
        os.sched_setaffinity(os.getpid(), allowed)
