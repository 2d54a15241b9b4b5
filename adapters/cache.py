"""The adapter cache: device slots (LRU, pins, busy counts) <- host memory (LRU by
bytes) <- the blob store. A small state machine over immutable adapter versions.

Threads: `try_acquire`, `release` and `maintenance` run on the engine thread (slots are
installed between forward passes, never during one); loads from the blob store run on
a loader thread so a cold adapter never stalls the batch; gRPC threads call `request_load`,
`unload`, `drop` and read `state`. One lock guards all of it."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

from hotlora.adapters.errors import HotloraError, NotFound, ResourceExhausted

log = logging.getLogger("hotlora.cache")

Key = Hashable


class AdapterCache:
    def __init__(
        self,
        num_slots: int,
        host_bytes: int,
        loader: Callable[[Key], object],  # key -> weights (slow: disk + validation), loader thread
        installer: Callable[[int, object], None],  # (slot, weights): engine thread
        clearer: Callable[[int], None],  # slot: engine thread
        nbytes: Callable[[object], int] = lambda w: w.nbytes,
        observer=None,
        owner_of: Callable[[Key], Hashable] = lambda key: None,  # whose pin quota a key counts against
    ):
        self.num_slots = num_slots
        self.host_bytes = host_bytes
        self._loader, self._installer, self._clearer, self._nbytes = loader, installer, clearer, nbytes
        self._owner_of = owner_of
        self.observer = observer
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._host: collections.OrderedDict[Key, object] = collections.OrderedDict()  # LRU first
        self._host_used = 0
        self._loading: set[Key] = set()
        self._load_errors: dict[Key, HotloraError] = {}
        self._slot_of: dict[Key, int] = {}
        self._key_in: list[Key | None] = [None] * num_slots
        self._device_lru: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._busy: collections.Counter[Key] = collections.Counter()
        self._pinned: set[Key] = set()
        self._wanted: collections.OrderedDict[Key, None] = collections.OrderedDict()
        # requests per key that found no slot in the last admission pass / in the current one
        self._waiting: collections.Counter[Key] = collections.Counter()
        self._waiting_now: collections.Counter[Key] = collections.Counter()
        self._evict_requested: set[Key] = set()
        self._doomed: set[Key] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotlora-adapter-load")

    # ---- engine thread ----------------------------------------------------------
    def try_acquire(self, key: Key) -> int | None:
        """The key's slot (now counted busy), or None while it loads or waits for a slot."""
        with self._lock:
            if key in self._doomed:
                raise NotFound("the adapter was deleted before the request started")
            err = self._load_errors.pop(key, None)
            if err is not None:
                self._wanted.pop(key, None)
                raise err
            slot = self._slot_of.get(key)
            if key in self._evict_requested:
                slot = None  # being unloaded: new requests wait for a fresh load, so the unload can finish
            if slot is not None:
                self._busy[key] += 1
                self._device_lru.move_to_end(key)
                self._waiting.pop(key, None)
                self._event("hit", "device")
                return slot
            self._event("miss", "device")
            self._waiting_now[key] += 1  # the engine asks once per queued request per pass
            self._want(key)
            return None

    def note_waiting(self, key: Key, n: int) -> None:
        with self._lock:
            self._waiting[key] = n

    def release(self, key: Key) -> None:
        with self._lock:
            self._busy[key] -= 1
            if self._busy[key] <= 0:
                del self._busy[key]

    def maintenance(self) -> None:
        """Install host-resident wanted adapters into slots; apply pending evictions."""
        with self._lock:
            # called once before every admission pass: publish the last pass's waiting counts
            self._waiting, self._waiting_now = self._waiting_now, collections.Counter()
            for key in list(self._evict_requested | self._doomed):
                if key in self._slot_of and not self._busy.get(key):
                    self._evict_slot(key)
                if key not in self._slot_of:
                    self._evict_requested.discard(key)
            for key in list(self._wanted):
                if key in self._slot_of:
                    self._wanted.pop(key)
                    continue
                weights = self._host.get(key)
                if weights is None:
                    if key not in self._loading:
                        self._start_load(key)
                    continue
                slot = self._free_slot()
                if slot is None:
                    break  # every slot pinned or busy: the request waits in the queue
                t0 = time.perf_counter()
                self._installer(slot, weights)
                self._observe_load("device", time.perf_counter() - t0)
                self._slot_of[key] = slot
                self._key_in[slot] = key
                self._device_lru[key] = None
                self._host.move_to_end(key)
                self._wanted.pop(key)
            self._changed.notify_all()

    # ---- any thread -------------------------------------------------------------
    def request_load(
        self, key: Key, pin: bool = False, timeout: float = 30.0, max_owner_pins: int | None = None
    ) -> None:
        """Warm `key` into a slot (and pin it) and wait until it is there. `max_owner_pins`: how many
        keys of `key`'s owner (a tenant) may be pinned at once, so one owner cannot pin every slot."""
        with self._lock:
            newly_pinned = pin and key not in self._pinned
            if pin:
                pinned_others = len(self._pinned - {key})
                if pinned_others >= self.num_slots:
                    raise ResourceExhausted(
                        f"all {self.num_slots} device slots are pinned; unpin or unload an adapter first"
                    )
                owner = self._owner_of(key)
                mine = sum(1 for k in self._pinned - {key} if self._owner_of(k) == owner)
                if max_owner_pins is not None and mine >= max_owner_pins:
                    raise ResourceExhausted(
                        f"tenant {owner!r} has {mine} pinned adapters, its limit (--max-pins-per-tenant); "
                        "unload one of them first (pins keep device slots from everyone else)"
                    )
                self._pinned.add(key)
            self._evict_requested.discard(key)
            self._want(key)
            deadline = time.monotonic() + timeout
            while key not in self._slot_of:
                err = self._load_errors.pop(key, None)
                if err is not None:
                    self._pinned.discard(key)
                    raise err
                left = deadline - time.monotonic()
                if left <= 0:
                    if newly_pinned:  # a failed LoadAdapter(pin) must not leave a pin behind
                        self._pinned.discard(key)
                    raise ResourceExhausted(
                        "no device slot became free in time: every slot is pinned or serving requests"
                    )
                self._changed.wait(min(left, 0.1))

    def offer_host(self, key: Key, weights) -> None:
        """Weights already parsed (a fresh upload or fine-tune): keep them in the host tier so the
        first request does not read and validate them from the blob store again."""
        with self._lock:
            if key in self._host or key in self._doomed:
                return
            self._host[key] = weights
            self._host_used += self._nbytes(weights)
            self._shrink_host()

    def unload(self, key: Key, timeout: float = 30.0) -> None:
        """Unpin and evict from device and host (in-flight requests finish first)."""
        with self._lock:
            self._pinned.discard(key)
            self._wanted.pop(key, None)
            self._drop_host(key)
            if key in self._slot_of:
                self._evict_requested.add(key)
            deadline = time.monotonic() + timeout
            while key in self._slot_of and time.monotonic() < deadline:
                self._changed.wait(0.1)

    def drop(self, key: Key) -> None:
        """The version was deleted: never serve it to a new request; in-flight ones finish."""
        with self._lock:
            self._doomed.add(key)
            self._pinned.discard(key)
            self._wanted.pop(key, None)
            self._drop_host(key)

    def state(self, key: Key) -> tuple[str, bool, int]:
        """(DEVICE | HOST | STORED, pinned, requests waiting for a slot)."""
        with self._lock:
            if key in self._slot_of:
                st = "DEVICE"
            elif key in self._host:
                st = "HOST"
            else:
                st = "STORED"
            return st, key in self._pinned, self._waiting.get(key, 0)

    def keys(self) -> set[Key]:
        """Every version held in memory (device or host) or on its way there."""
        with self._lock:
            return set(self._slot_of) | set(self._host) | set(self._loading) | set(self._wanted)

    def slot_of(self, key: Key) -> int | None:
        with self._lock:
            return self._slot_of.get(key)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "device": len(self._slot_of),
                "host": sum(1 for k in self._host if k not in self._slot_of),
                "pinned": len(self._pinned),
                "loading": len(self._loading),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals (lock held) --------------------------------------------------
    def _want(self, key: Key) -> None:
        if key not in self._slot_of:
            self._wanted[key] = None
            if key not in self._host and key not in self._loading:
                self._start_load(key)

    def _start_load(self, key: Key) -> None:
        self._loading.add(key)
        self._event("miss", "host")
        self._pool.submit(self._load, key)

    def _load(self, key: Key) -> None:
        t0 = time.perf_counter()
        try:
            weights = self._loader(key)
        except Exception as exc:
            log.warning("loading adapter %s failed: %s", key, exc)
            if self.observer is not None and hasattr(self.observer, "adapter_load_failed"):
                self.observer.adapter_load_failed("host")
            err = (
                exc if isinstance(exc, HotloraError) else NotFound(f"the adapter could not be loaded: {exc}")
            )
            with self._lock:
                self._loading.discard(key)
                self._load_errors[key] = err
                self._changed.notify_all()
            return
        self._observe_load("host", time.perf_counter() - t0)
        with self._lock:
            self._loading.discard(key)
            if key in self._doomed:
                return
            self._host[key] = weights
            self._host_used += self._nbytes(weights)
            self._shrink_host()
            self._changed.notify_all()

    def _shrink_host(self) -> None:
        for k in list(self._host):
            if self._host_used <= self.host_bytes:
                break
            if k in self._wanted:
                continue  # about to be installed
            self._drop_host(k)
            self._event("eviction", "host")

    def _drop_host(self, key: Key) -> None:
        w = self._host.pop(key, None)
        if w is not None:
            self._host_used -= self._nbytes(w)

    def _free_slot(self) -> int | None:
        for slot, k in enumerate(self._key_in):
            if k is None:
                return slot
        for k in self._device_lru:  # least recently used first
            if not self._busy.get(k) and k not in self._pinned:
                slot = self._slot_of[k]
                self._evict_slot(k)
                return slot
        return None

    def _evict_slot(self, key: Key) -> None:
        slot = self._slot_of.pop(key)
        self._key_in[slot] = None
        self._device_lru.pop(key, None)
        self._clearer(slot)
        self._event("eviction", "device")

    def _event(self, event: str, tier: str) -> None:
        if self.observer is not None:
            try:
                self.observer.adapter_cache_event(event, tier)
            except Exception:
                pass

    def _observe_load(self, tier: str, seconds: float) -> None:
        if self.observer is not None:
            try:
                self.observer.adapter_load_seconds(tier, seconds)
            except Exception:
                pass
