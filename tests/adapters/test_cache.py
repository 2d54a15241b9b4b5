"""The adapter cache on its own: a fake loader, installer and clearer, no model and no server. Every test
asserts the slot table (which key sits in each device slot) after each load, pin, eviction and delete.

The engine calls `maintenance` once before each admission pass and `try_acquire` per queued request; the
tests do the same by hand, in `admit`."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from hotlora.adapters.cache import AdapterCache, State
from hotlora.adapters.errors import InvalidArgument, NotFound, ResourceExhausted

SLOTS = 2
MB = 1 << 20


@dataclass(frozen=True)
class Weights:
    name: str
    nbytes: int = MB


class Recorder:
    """The observer, keeping every event."""

    def __init__(self):
        self.events: list[tuple] = []

    def adapter_cache_event(self, event, tier):
        self.events.append((event, tier))

    def adapter_load_seconds(self, tier, seconds):
        self.events.append(("load", tier))

    def adapter_load_failed(self, tier):
        self.events.append(("failed", tier))

    def count(self, *event) -> int:
        return self.events.count(event)


class Fake:
    """A cache over a fake slot array. The loader reads a source string; "bad:..." fails to load, and a source
    in `gates` blocks until its event is set."""

    def __init__(self, slots: int = SLOTS, host_bytes: int = 100 * MB):
        self.device: list[str | None] = [None] * slots
        self.loaded: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.observer = Recorder()
        self.cache = AdapterCache(
            slots,
            host_bytes,
            loader=self.load,
            installer=self.install,
            clearer=self.clear,
            observer=self.observer,
            owner_of=lambda key: key[0],
        )

    def load(self, source: str) -> Weights:
        if source in self.gates:
            assert self.gates[source].wait(10)
        self.loaded.append(source)
        if source.startswith("bad:"):
            raise ValueError("corrupt safetensors")
        if source.startswith("invalid:"):
            raise InvalidArgument("rank 99 is over --max-rank")
        return Weights(source)

    def install(self, slot: int, weights: Weights) -> None:
        self.device[slot] = weights.name

    def clear(self, slot: int) -> None:
        self.device[slot] = None

    def table(self) -> list:
        """The cache's slot table, checked against what the fake device holds."""
        keys = self.cache.slot_table()
        assert self.device == [None if k is None else _source(k) for k in keys]
        return keys

    def admit(self, key, source=None):
        """One admission pass for one request: maintenance, then try_acquire."""
        self.cache.maintenance()
        return self.cache.try_acquire(key, source or _source(key))

    def acquire(self, key, source=None, passes: int = 200) -> int:
        """Admission passes until `key` gets a slot (its load runs on the loader thread)."""
        for _ in range(passes):
            slot = self.admit(key, source)
            if slot is not None:
                return slot
            self.settle()
        raise AssertionError(f"{key} never got a slot; table {self.table()}")

    def settle(self) -> None:
        """Wait for the loader thread to finish what was submitted so far."""
        self.cache._pool.submit(lambda: None).result(timeout=10)


def _key(name: str, tenant: str = "t") -> tuple:
    return (tenant, name, 1)


def _source(key: tuple) -> str:
    return f"{key[0]}/{key[1]}"


@pytest.fixture
def fake():
    f = Fake()
    yield f
    f.cache.close()


A, B, C = _key("a"), _key("b"), _key("c")


def test_a_cold_key_loads_on_the_loader_thread_then_installs_on_the_next_pass(fake):
    assert fake.admit(A) is None  # not in memory: a load starts, the request waits
    assert fake.cache.state(A) == ("STORED", False, 0)
    fake.settle()
    assert fake.cache.entry_state(A) is State.HOST
    assert fake.cache.state(A)[0] == "HOST"
    assert fake.table() == [None, None]
    assert fake.admit(A) == 0
    assert fake.table() == [A, None]
    assert fake.cache.state(A)[0] == "DEVICE"
    assert fake.loaded == ["t/a"]  # loaded from the source the request carried, once
    assert fake.observer.count("miss", "device") == 1 and fake.observer.count("miss", "host") == 1
    assert fake.observer.count("hit", "device") == 1
    assert fake.observer.count("load", "host") == 1 and fake.observer.count("load", "device") == 1
    fake.cache.release(A)


def test_least_recently_used_idle_slot_is_evicted_and_its_host_copy_serves_the_next_miss(fake):
    for key in (A, B):
        fake.acquire(key)
        fake.cache.release(key)
    assert fake.table() == [A, B]
    fake.admit(A)  # A used again: B is now the least recently used
    fake.cache.release(A)
    fake.acquire(C)
    assert fake.table() == [A, C]
    assert fake.observer.count("eviction", "device") == 1
    assert fake.cache.state(B)[0] == "HOST"  # still in host memory
    fake.cache.release(C)
    misses = fake.observer.count("miss", "host")
    assert fake.admit(B) is None  # no slot yet, but no load either: the host tier has it
    assert fake.observer.count("miss", "host") == misses
    assert fake.admit(B) == 0
    assert fake.table() == [B, C]  # A was least recently used this time
    assert fake.loaded == ["t/a", "t/b", "t/c"]  # B never read from the store twice


def test_a_busy_slot_is_never_evicted(fake):
    fake.acquire(A)
    fake.acquire(B)  # both busy (never released)
    assert fake.table() == [A, B]
    for _ in range(3):
        assert fake.admit(C) is None
        fake.settle()
    assert fake.table() == [A, B]
    assert fake.cache.state(C) == ("HOST", False, 1)  # one request found no slot in the last pass
    fake.cache.release(B)
    fake.acquire(C)
    assert fake.table() == [A, C]


def pin(fake: Fake, key, **limits) -> None:
    """LoadAdapter(pin): request_load on an rpc thread while the engine thread runs its passes."""
    done, failed = threading.Event(), []

    def rpc():
        try:
            fake.cache.request_load(key, _source(key), pin=True, timeout=5.0, **limits)
        except Exception as exc:
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=rpc).start()
    while not done.wait(0.01):
        fake.cache.maintenance()
    if failed:
        raise failed[0]


def test_pins_keep_their_slot_and_pinning_every_slot_is_refused(fake):
    pin(fake, A)
    assert fake.table() == [A, None]
    assert fake.cache.state(A) == ("DEVICE", True, 0)
    pin(fake, B)
    assert fake.table() == [A, B]
    assert fake.cache.counts() == {"device": 2, "host": 0, "pinned": 2, "loading": 0}
    with pytest.raises(ResourceExhausted, match=f"all {SLOTS} device slots are pinned; unpin or unload"):
        fake.cache.request_load(C, "t/c", pin=True, timeout=1.0)
    assert fake.cache.entry_state(C) is None  # the refused pin left nothing behind
    assert fake.cache.counts()["pinned"] == 2
    # a request for a third adapter waits: pinned slots are never evicted
    for _ in range(3):
        assert fake.admit(C) is None
        fake.settle()
    assert fake.table() == [A, B]
    assert fake.cache.state(C) == ("HOST", False, 1)
    fake.cache.unload(B, timeout=0.0)  # unpinned, and evicted on the next pass
    fake.acquire(C)
    assert fake.table() == [A, C]
    assert fake.cache.state(B) == ("STORED", False, 0)
    assert fake.cache.state(A) == ("DEVICE", True, 0)


def test_load_adapter_sees_its_install_even_when_the_next_pass_wants_the_slot(fake):
    """Under traffic the engine may install a LoadAdapter'd version and, on its very next pass, need an idle
    slot for a waiting request before the caller's thread gets the lock back: the caller must still
    return with its version in a slot (DEVICE), not wait out its timeout."""
    fake.acquire(A)  # slot 0 stays busy: the only slot to evict is the one the load gets
    fake.cache.offer_host(B, "t/b", Weights("t/b"))  # B needs no load: ready the moment it is asked for
    answer: list = []
    caller = threading.Thread(target=lambda: answer.append(fake.cache.request_load(C, "t/c", timeout=10)))
    with fake.cache._lock:  # the engine thread runs passes back to back; the caller waits for the lock
        caller.start()
        for _ in range(1000):  # the caller queues C, its load runs (both need the lock: wait releases it)
            if fake.cache.entry_state(C) is State.HOST:
                break
            fake.cache._changed.wait(0.01)
        fake.cache.maintenance()  # C installed in slot 1
        assert fake.table() == [A, C]
        assert fake.admit(B) is None  # a request for B misses and queues
        fake.cache.maintenance()  # without the caller's hold, idle C would be evicted for B here
        assert fake.table() == [A, C]
    caller.join(10)
    assert answer == [("DEVICE", False, 0)]
    fake.cache.maintenance()  # the caller has its answer: C is an ordinary idle slot again
    assert fake.table() == [A, B]
    fake.cache.release(A)


def test_pins_per_owner_are_limited(fake):
    with pytest.raises(ResourceExhausted, match="tenant 't' has 0 pinned adapters"):
        fake.cache.request_load(A, "t/a", pin=True, timeout=0.0, max_owner_pins=0)
    assert fake.cache.counts()["pinned"] == 0


def test_unload_waits_for_in_flight_requests_and_new_ones_wait_for_a_fresh_load(fake):
    fake.acquire(A)
    fake.cache.unload(A, timeout=0.0)
    assert fake.cache.entry_state(A) is State.EVICTING
    fake.cache.maintenance()
    assert fake.table() == [A, None]  # still busy: the in-flight request finishes on it
    assert fake.admit(A) is None  # a new request is not served from an evicting slot
    fake.cache.release(A)
    fake.cache.maintenance()
    assert fake.table() == [None, None]
    assert fake.cache.state(A)[0] == "STORED"
    fake.acquire(A)
    assert fake.loaded == ["t/a", "t/a"]  # the host copy went with the unload


def test_delete_frees_the_slot_after_in_flight_requests_and_refuses_new_ones(fake):
    fake.acquire(A)
    fake.cache.drop(A)
    assert fake.cache.entry_state(A) is State.DELETED
    fake.cache.maintenance()
    assert fake.table() == [A, None]  # busy: the in-flight request keeps its slot
    with pytest.raises(NotFound, match="deleted before the request started"):
        fake.cache.try_acquire(A, "t/a")
    fake.cache.release(A)
    fake.cache.maintenance()
    assert fake.table() == [None, None]
    assert fake.observer.count("eviction", "device") == 1
    with pytest.raises(NotFound):
        fake.admit(A)
    with pytest.raises(NotFound):
        fake.cache.request_load(A, "t/a", timeout=0.0)
    fake.cache.offer_host(A, "t/a", Weights("t/a"))
    assert fake.cache.state(A)[0] == "STORED" and fake.cache.counts()["host"] == 0
    assert A not in fake.cache.keys()


def test_a_version_deleted_while_it_loads_is_discarded(fake):
    fake.gates["t/a"] = threading.Event()
    assert fake.admit(A) is None
    fake.cache.drop(A)
    fake.gates["t/a"].set()
    fake.settle()
    assert fake.cache.counts() == {"device": 0, "host": 0, "pinned": 0, "loading": 0}
    assert fake.cache.keys() == set()
    assert fake.table() == [None, None]


def test_a_failed_load_is_counted_reported_once_and_leaves_no_entry(fake):
    assert fake.admit(A, "bad:a") is None
    fake.settle()
    assert fake.observer.count("failed", "host") == 1
    assert fake.cache.counts() == {"device": 0, "host": 0, "pinned": 0, "loading": 0}
    with pytest.raises(NotFound, match="could not be loaded: corrupt safetensors"):
        fake.admit(A, "bad:a")
    assert fake.cache.entry_state(A) is None and fake.cache.keys() == set()
    assert fake.table() == [None, None]
    assert fake.loaded == ["bad:a"]  # not retried behind the request's back
    # a later request tries again (and the error of a HotloraError load is passed on as it is)
    assert fake.admit(A, "invalid:a") is None
    fake.settle()
    with pytest.raises(InvalidArgument, match="over --max-rank"):
        fake.cache.request_load(A, "invalid:a", pin=True, timeout=1.0)
    assert fake.cache.counts()["pinned"] == 0


def test_load_adapter_reports_a_failed_load_and_leaves_no_pin(fake):
    with pytest.raises(NotFound, match="could not be loaded"):
        fake.cache.request_load(A, "bad:a", pin=True, timeout=5.0)
    assert fake.cache.entry_state(A) is None
    assert fake.cache.counts()["pinned"] == 0


def test_host_tier_keeps_within_its_bytes_least_recently_used_first():
    fake = Fake(slots=1, host_bytes=2 * MB)
    try:
        fake.cache.offer_host(A, "t/a", Weights("t/a"))
        fake.cache.offer_host(B, "t/b", Weights("t/b"))
        assert fake.cache.counts()["host"] == 2
        fake.cache.offer_host(C, "t/c", Weights("t/c"))
        assert fake.observer.count("eviction", "host") == 1
        assert [fake.cache.state(k)[0] for k in (A, B, C)] == ["STORED", "HOST", "HOST"]
        assert fake.admit(B) is None  # a host-tier hit: queued, installed on the next pass
        assert fake.admit(B) == 0
        assert fake.table() == [B]
        assert fake.loaded == []  # offered weights are never read from the store
        fake.cache.release(B)
    finally:
        fake.cache.close()


def test_dropping_a_key_nobody_asked_for_refuses_later_requests(fake):
    fake.cache.drop(A)  # e.g. deleted on another replica before this one served it
    with pytest.raises(NotFound):
        fake.admit(A)
    assert fake.loaded == []


def test_waiting_counts_publish_per_admission_pass(fake):
    fake.acquire(A)
    fake.acquire(B)
    fake.cache.maintenance()
    for _ in range(3):  # three queued requests in one pass
        assert fake.cache.try_acquire(C, "t/c") is None
    assert fake.cache.state(C)[2] == 0  # the pass is still counting
    fake.cache.maintenance()
    assert fake.cache.state(C)[2] == 3
    fake.cache.maintenance()  # a pass in which nobody asked
    assert fake.cache.state(C)[2] == 0
