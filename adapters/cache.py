"""The adapter cache: device slots (LRU, pins, busy counts) <- host memory (LRU by
bytes) <- the blob store. One table of entries, one per immutable adapter version, each
in one `State`; every change of state is a method below that asserts where it starts.

Threads: `try_acquire`, `release` and `maintenance` run on the engine thread (slots are
installed between forward passes, never during one); loads from the blob store run on
a loader thread so a cold adapter never stalls the batch; gRPC threads call `request_load`,
`unload`, `drop` and read `state`. One lock guards all of it.

Over 400 lines on purpose: the table and all of its transitions stay in one module, so the state machine
can be read (and checked against tests/adapters/test_cache.py) in one place."""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hotlora.adapters.errors import FailedPrecondition, HotloraError, NotFound, ResourceExhausted
from hotlora.adapters.observer import NO_OBSERVER, AdapterObserver

log = logging.getLogger("hotlora.cache")

Key = Hashable


class State(enum.Enum):
    STORED = "STORED"  # nothing in memory: only the blob store has it (or its load just failed: `error`)
    LOADING = "LOADING"  # the loader thread is reading and validating it
    HOST = "HOST"  # parsed weights in host memory, no slot
    DEVICE = "DEVICE"  # installed in `slot` (its host copy may remain, in `weights`)
    EVICTING = "EVICTING"  # in `slot`, unloaded: in-flight requests finish, new ones wait, then it frees
    DELETED = "DELETED"  # the version was deleted: never served again; keeps `slot` till in-flight ones end


IN_SLOT = (State.DEVICE, State.EVICTING, State.DELETED)


@dataclass(eq=False)
class Entry:
    """One adapter version the cache knows of. DELETED entries stay as tombstones, so a request resolved
    before the delete is refused when it reaches admission; STORED ones with nothing to keep are forgotten."""

    key: Key
    source: object  # what the loader reads the weights from (the registry record)
    state: State = State.STORED
    slot: int | None = None
    weights: object | None = None  # the host-tier copy
    busy: int = 0  # admitted requests using the slot
    pinned: bool = False
    # LoadAdapter callers waiting for it: not evicted nor forgotten meanwhile, or a busy cache could install
    # it and evict it again before the caller's thread got the lock to see it installed
    awaited: int = 0
    error: HotloraError | None = None  # a failed load, for the next one who asks
    # requests that found no slot: `counting` in admission pass `counting_pass`, `waiting` in the one before
    counting: int = 0
    counting_pass: int = -1
    waiting: int = 0
    device_used: int = 0  # ticks of the last install or hit (device LRU)
    host_used: int = 0  # ticks of the last host insert or install (host LRU)


class AdapterCache:
    def __init__(
        self,
        num_slots: int,
        host_bytes: int,
        loader: Callable[[object], object],  # source -> weights (slow: disk + validation), loader thread
        installer: Callable[[int, object], None],  # (slot, weights): engine thread
        clearer: Callable[[int], None],  # slot: engine thread
        nbytes: Callable[[object], int] = lambda w: w.nbytes,
        observer: AdapterObserver = NO_OBSERVER,
        owner_of: Callable[[Key], Hashable] = lambda key: None,  # whose pin quota a key counts against
    ):
        self.num_slots = num_slots
        self.host_bytes = host_bytes
        self._loader, self._installer, self._clearer, self._nbytes = loader, installer, clearer, nbytes
        self._owner_of = owner_of
        self.observer = observer
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._entries: dict[Key, Entry] = {}
        self._slots: list[Entry | None] = [None] * num_slots  # the slot table
        # entries asked for and not in a slot yet (LOADING or HOST), first asked first installed
        self._queue: collections.OrderedDict[Key, Entry] = collections.OrderedDict()
        self._host_used = 0
        self._pass = 0  # admission passes so far (one `maintenance` each)
        self._ticks = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlora-adapter-load")

    # ---- engine thread ----------------------------------------------------------
    def try_acquire(self, key: Key, source: object) -> int | None:
        """The key's slot (now counted busy), or None while it loads or waits for a slot.
        `source` is what to load it from if it is not in memory."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.state is State.DELETED:
                raise NotFound("the adapter was deleted before the request started")
            if e is not None and e.error is not None:
                self._deliver_error(e)
            if e is not None and e.state is State.DEVICE:
                e.busy += 1
                e.device_used = next(self._ticks)
                e.waiting = e.counting = 0  # no longer waiting
                self._report(self.observer.adapter_cache_event, "hit", "device")
                return e.slot
            # an EVICTING entry is not served: new requests wait for a fresh load, so the unload can finish
            self._report(self.observer.adapter_cache_event, "miss", "device")
            e = self._entry(key, source)
            self._count_waiting(e)
            self._want(e)
            return None

    def release(self, key: Key) -> None:
        with self._lock:
            e = self._entries[key]
            assert e.busy > 0 and e.state in IN_SLOT, (key, e.state, e.busy)
            e.busy -= 1

    def maintenance(self) -> None:
        """Free the slots of unloaded and deleted versions nobody uses any more; install host-resident
        queued adapters into slots. Called once before every admission pass."""
        with self._lock:
            self._pass += 1
            for e in self._slots:
                if e is not None and e.state is not State.DEVICE and e.busy == 0:
                    self._free_slot_of(e)
            for e in list(self._queue.values()):
                if e.state is State.LOADING:
                    continue
                slot = self._free_slot()
                if slot is None:
                    break  # every slot pinned or busy: the request waits in the queue
                self._install(e, slot)  # a failed install leaves the slot free and the error for its askers
            self._changed.notify_all()

    # ---- any thread -------------------------------------------------------------
    def request_load(
        self,
        key: Key,
        source: object,
        pin: bool = False,
        timeout: float = 30.0,
        max_owner_pins: int | None = None,
    ) -> tuple[str, bool, int]:
        """Warm `key` into a slot (and pin it) and wait until it is there; returns `state(key)` as it was
        then. `max_owner_pins`: how many keys of `key`'s owner (a tenant) may be pinned at once, so one
        owner cannot pin every slot."""
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.state is State.DELETED:
                raise NotFound("the adapter was deleted")
            if e is not None and e.error is not None:
                self._deliver_error(e)
            if pin:
                self._check_pin(key, max_owner_pins)  # before any entry is made: a refusal leaves nothing
            e = self._entry(key, source)
            newly_pinned = pin and not e.pinned
            e.pinned = e.pinned or pin
            if e.state is State.EVICTING:
                self._cancel_eviction(e)
            self._want(e)
            deadline = time.monotonic() + timeout
            e.awaited += 1
            try:
                while e.slot is None:
                    if e.state is State.DELETED:
                        raise NotFound("the adapter was deleted while it loaded")
                    if e.error is not None:
                        e.pinned = False
                        self._deliver_error(e)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        if newly_pinned:  # a failed LoadAdapter(pin) must not leave a pin behind
                            e.pinned = False
                        raise ResourceExhausted(
                            "no device slot became free in time: every slot is pinned or serving requests"
                        )
                    self._changed.wait(min(left, 0.1))
                return "DEVICE", e.pinned, self._waiting(e)
            finally:
                e.awaited -= 1
                self._forget_if_idle(e)  # a refused or failed load leaves nothing behind

    def offer_host(self, key: Key, source: object, weights) -> None:
        """Weights already parsed (a fresh upload or fine-tune): keep them in the host tier so the
        first request does not read and validate them from the blob store again."""
        with self._lock:
            e = self._entry(key, source)
            if e.weights is not None or e.state is State.DELETED:
                return
            self._keep_on_host(e, weights)
            self._shrink_host()

    def unload(self, key: Key, timeout: float = 30.0) -> None:
        """Unpin and evict from device and host (in-flight requests finish first)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return
            e.pinned = False
            self._queue.pop(key, None)
            self._drop_host_copy(e)
            if e.state is State.DEVICE:
                self._start_eviction(e)
            self._forget_if_idle(e)
            deadline = time.monotonic() + timeout
            while e.slot is not None and time.monotonic() < deadline:
                self._changed.wait(0.1)

    def drop(self, key: Key) -> None:
        """The version was deleted: never serve it to a new request; in-flight ones finish."""
        with self._lock:
            e = self._entry(key, None)
            e.pinned = False
            e.error = None
            self._queue.pop(key, None)
            self._drop_host_copy(e)
            e.state = State.DELETED  # from any state; the slot is freed by `maintenance` once idle

    def state(self, key: Key) -> tuple[str, bool, int]:
        """(DEVICE | HOST | STORED, pinned, requests waiting for a slot in the last admission pass)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return "STORED", False, 0
            shown = "DEVICE" if e.slot is not None else "HOST" if e.weights is not None else "STORED"
            return shown, e.pinned, self._waiting(e)

    def keys(self) -> set[Key]:
        """Every version held in memory (device or host) or on its way there."""
        with self._lock:
            return {
                k
                for k, e in self._entries.items()
                if e.slot is not None or e.weights is not None or e.state is State.LOADING or k in self._queue
            }

    def slot_of(self, key: Key) -> int | None:
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.slot

    def slot_table(self) -> list[Key | None]:
        """The key in each device slot (None: free), for tests and debugging."""
        with self._lock:
            return [None if e is None else e.key for e in self._slots]

    def entry_state(self, key: Key) -> State | None:
        """The entry's full state (None: the cache holds nothing about `key`)."""
        with self._lock:
            e = self._entries.get(key)
            return None if e is None else e.state

    def placements(self) -> list[tuple[Key, str, bool, int]]:
        """(key, tier, pinned, recency) of every version held in memory: tier "device" (in a slot, its host
        copy aside) or "host"; a larger recency was used more recently."""
        with self._lock:
            return [
                (e.key, "device" if e.slot is not None else "host", e.pinned, max(e.device_used, e.host_used))
                for e in self._entries.values()
                if e.slot is not None or e.weights is not None
            ]

    def counts(self) -> dict[str, int]:
        with self._lock:
            entries = self._entries.values()
            return {
                "device": sum(1 for e in entries if e.slot is not None),
                "host": sum(1 for e in entries if e.weights is not None and e.slot is None),
                "pinned": sum(1 for e in entries if e.pinned),
                "loading": sum(1 for e in entries if e.state is State.LOADING),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- transitions (lock held) ------------------------------------------------
    def _begin_load(self, e: Entry) -> None:
        assert e.state is State.STORED, e.state
        e.state = State.LOADING
        self._report(self.observer.adapter_cache_event, "miss", "host")
        self._pool.submit(self._load, e)

    def _loaded(self, e: Entry, weights) -> None:
        assert e.state is State.LOADING, e.state
        self._keep_on_host(e, weights)
        self._shrink_host()

    def _load_failed(self, e: Entry, err: HotloraError) -> None:
        """LOADING -> STORED, the error kept for the next one who asks; no half entry stays queued."""
        assert e.state is State.LOADING, e.state
        e.state = State.STORED
        e.error = err
        self._queue.pop(e.key, None)

    def _keep_on_host(self, e: Entry, weights) -> None:
        """STORED or LOADING -> HOST; in a slot, the state stays and only the host copy is kept."""
        assert e.weights is None and e.state is not State.DELETED, e.state
        e.weights = weights
        e.host_used = next(self._ticks)
        self._host_used += self._nbytes(weights)
        if e.state in (State.STORED, State.LOADING):
            e.state = State.HOST

    def _drop_host_copy(self, e: Entry) -> None:
        """HOST -> STORED; in a slot, only the host copy goes."""
        if e.weights is None:
            return
        self._host_used -= self._nbytes(e.weights)
        e.weights = None
        if e.state is State.HOST:
            e.state = State.STORED

    def _install(self, e: Entry, slot: int) -> None:
        assert e.state is State.HOST and self._slots[slot] is None, (e.state, slot)
        t0 = time.perf_counter()
        try:
            self._installer(slot, e.weights)
        except Exception as exc:  # HOST -> STORED with the error: its requests fail, nothing retries forever
            self._install_failed(e, slot, exc)
            return
        self._report(self.observer.adapter_load_seconds, "device", time.perf_counter() - t0)
        e.state, e.slot = State.DEVICE, slot
        self._slots[slot] = e
        e.device_used = e.host_used = next(self._ticks)
        self._queue.pop(e.key)

    def _install_failed(self, e: Entry, slot: int, exc: Exception) -> None:
        log.warning("installing adapter %s into slot %d failed: %s", e.key, slot, exc)
        self._report(self.observer.adapter_load_failed, "device")
        try:
            self._clearer(slot)  # whatever the installer wrote before it failed
        except Exception:
            log.exception("clearing slot %d after a failed install failed", slot)
        self._queue.pop(e.key, None)
        self._drop_host_copy(e)
        e.error = (
            exc
            if isinstance(exc, HotloraError)
            else FailedPrecondition(f"the adapter could not be installed on this server: {exc}")
        )

    def _start_eviction(self, e: Entry) -> None:
        assert e.state is State.DEVICE, e.state
        e.state = State.EVICTING

    def _cancel_eviction(self, e: Entry) -> None:
        assert e.state is State.EVICTING, e.state
        e.state = State.DEVICE

    def _free_slot_of(self, e: Entry) -> None:
        """DEVICE or EVICTING -> HOST (or STORED without a host copy); DELETED stays DELETED."""
        assert e.state in IN_SLOT and e.busy == 0, (e.state, e.busy)
        self._slots[e.slot] = None
        self._clearer(e.slot)
        e.slot = None
        if e.state is not State.DELETED:
            e.state = State.HOST if e.weights is not None else State.STORED
        self._report(self.observer.adapter_cache_event, "eviction", "device")
        self._forget_if_idle(e)

    # ---- helpers (lock held) ----------------------------------------------------
    def _entry(self, key: Key, source: object) -> Entry:
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = Entry(key, source)
        return e

    def _forget_if_idle(self, e: Entry) -> None:
        """A STORED entry with nothing to remember leaves the table (its waiting count goes with it: a
        request still queued for it counts again, and loads it, on its next admission attempt)."""
        if (
            e.state is State.STORED
            and not e.pinned
            and not e.awaited
            and e.error is None
            and e.key not in self._queue
        ):
            del self._entries[e.key]

    def _deliver_error(self, e: Entry) -> None:
        err, e.error = e.error, None
        self._forget_if_idle(e)
        raise err

    def _want(self, e: Entry) -> None:
        """Queue `e` for a slot, loading it first if it is not in memory."""
        if e.slot is not None:
            return
        self._queue.setdefault(e.key, e)
        if e.state is State.STORED:
            self._begin_load(e)

    def _check_pin(self, key: Key, max_owner_pins: int | None) -> None:
        others = [e for k, e in self._entries.items() if e.pinned and k != key]
        if len(others) >= self.num_slots:
            raise ResourceExhausted(
                f"all {self.num_slots} device slots are pinned; unpin or unload an adapter first"
            )
        owner = self._owner_of(key)
        mine = sum(1 for e in others if self._owner_of(e.key) == owner)
        if max_owner_pins is not None and mine >= max_owner_pins:
            raise ResourceExhausted(
                f"tenant {owner!r} has {mine} pinned adapters, its limit (--max-pins-per-tenant); "
                "unload one of them first (pins keep device slots from everyone else)"
            )

    def _count_waiting(self, e: Entry) -> None:
        """The engine asks once per queued request per admission pass; count this pass's misses."""
        if e.counting_pass != self._pass:  # the first of this pass: the pass it last counted in is over
            e.waiting = e.counting if e.counting_pass == self._pass - 1 else 0
            e.counting_pass, e.counting = self._pass, 0
        e.counting += 1

    def _waiting(self, e: Entry) -> int:
        """Requests that found no slot in the last finished admission pass (the one before the latest
        `maintenance`); the current pass is still counting."""
        if e.counting_pass == self._pass:
            return e.waiting
        return e.counting if e.counting_pass == self._pass - 1 else 0

    def _free_slot(self) -> int | None:
        for slot, e in enumerate(self._slots):
            if e is None:
                return slot
        idle = [e for e in self._slots if e.state is State.DEVICE and not (e.busy or e.pinned or e.awaited)]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.device_used)  # least recently used
        slot = victim.slot
        self._free_slot_of(victim)
        return slot

    def _shrink_host(self) -> None:
        if self._host_used <= self.host_bytes:
            return
        held = sorted((e for e in self._entries.values() if e.weights is not None), key=lambda e: e.host_used)
        for e in held:
            if self._host_used <= self.host_bytes:
                break
            if e.key in self._queue:
                continue  # about to be installed
            self._drop_host_copy(e)
            self._report(self.observer.adapter_cache_event, "eviction", "host")
            self._forget_if_idle(e)

    def _report(self, hook: Callable[..., None], *args) -> None:
        try:  # metrics never break the cache's bookkeeping
            hook(*args)
        except Exception:
            log.debug("adapter cache observer failed", exc_info=True)

    # ---- loader thread ----------------------------------------------------------
    def _load(self, e: Entry) -> None:
        t0 = time.perf_counter()
        try:
            weights = self._loader(e.source)
        except Exception as exc:
            log.warning("loading adapter %s failed: %s", e.key, exc)
            self._report(self.observer.adapter_load_failed, "host")
            err = (
                exc if isinstance(exc, HotloraError) else NotFound(f"the adapter could not be loaded: {exc}")
            )
            with self._lock:
                if e.state is State.LOADING:  # not deleted (or offered) meanwhile
                    self._load_failed(e, err)
                self._changed.notify_all()
            return
        self._report(self.observer.adapter_load_seconds, "host", time.perf_counter() - t0)
        with self._lock:
            if e.state is State.LOADING:
                self._loaded(e, weights)
            self._changed.notify_all()
