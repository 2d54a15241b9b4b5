"""Adapter operations behind the Adapters rpcs and adapter resolution for inference:
the registry (what is stored), the cache (what is loaded), tenancy and limits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.cache import AdapterCache
from hotlora.adapters.errors import FailedPrecondition, NotFound
from hotlora.adapters.head_features import HEAD_FILE, HeadFeatures
from hotlora.adapters.names import format_ref, validate_name
from hotlora.adapters.observer import NO_OBSERVER, AdapterObserver
from hotlora.adapters.peft.export_readme import README_FILE, export_readme
from hotlora.adapters.peft.files import CONFIG_FILE
from hotlora.adapters.peft.format import IGNORED_FILES, RECORD_FILE, AdapterLimits, parse_peft_adapter
from hotlora.adapters.runtime import SlotContents
from hotlora.adapters.store.metadata_store import AdapterRecord, TenantQuota
from hotlora.adapters.store.registry import AdapterRegistry, peft_files
from hotlora.adapters.store.registry_changes import RegistryChange
from hotlora.adapters.store.upload_spool import UploadSpooler


@dataclass(frozen=True)
class AdapterHandle:
    """One immutable adapter version as a request carries it: the record it was resolved to, so a cold
    load reads exactly that version without asking the registry again."""

    record: AdapterRecord

    @property
    def key(self) -> tuple[str, str, int]:
        """(tenant, name, version): the cache's key."""
        return _key(self.record)

    @property
    def ref(self) -> str:  # name@N
        return self.record.ref

    @property
    def task(self) -> str:
        return self.record.task

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.record.labels)


@dataclass(frozen=True)
class AdapterView:
    record: AdapterRecord
    state: str  # STORED | HOST | DEVICE
    pinned: bool
    waiting: int
    device: str = ""  # DEVICE: the compute device whose slot holds it ("cpu", "cuda:0"); else ""
    replica: str = ""  # the replica whose cache the state describes


def peft_only(files: dict[str, bytes]) -> dict[str, bytes]:
    return {f: d for f, d in files.items() if f != RECORD_FILE}


def _key(rec: AdapterRecord) -> tuple[str, str, int]:
    return (rec.tenant, rec.name, rec.version)


class AdapterService:
    def __init__(
        self,
        registry: AdapterRegistry,
        base: BaseModelInfo,
        limits: AdapterLimits,
        slots: SlotContents,
        host_bytes: int,
        max_per_tenant: int = 1000,
        observer: AdapterObserver = NO_OBSERVER,
        *,
        max_tenant_bytes: int = 1 << 62,
        uploads: UploadSpooler | None = None,
        max_pins_per_tenant: int | None = None,
        replica_id: str = "",
    ):
        self.registry = registry
        self.replica_id = replica_id
        self.base = base
        self.limits = limits
        self.max_per_tenant = max_per_tenant
        self.quota = TenantQuota(max_per_tenant, max_tenant_bytes)
        self.uploads = uploads
        self.max_pins_per_tenant = max_pins_per_tenant
        self.device = str(slots.device)
        self.cache = AdapterCache(
            slots.num_slots,
            host_bytes,
            loader=self._load_weights,
            installer=slots.install,
            clearer=slots.clear,
            observer=observer,
            owner_of=lambda key: key[0],  # (tenant, name, version): pins count per tenant
        )
        # other replicas sharing the registry: free what they deleted, evict what they unloaded
        registry.metadata.subscribe(self._apply_change, self._resync)

    def _apply_change(self, change: RegistryChange) -> None:
        if change.op == "delete":
            self.registry.resolved.forget(change.tenant, change.name)
        versions = change.versions or tuple(
            v for (t, n, v) in self.cache.keys() if (t, n) == (change.tenant, change.name)
        )
        for version in versions:
            key = (change.tenant, change.name, version)
            if change.op == "delete":
                self.cache.drop(key)
            else:
                self.cache.unload(key, timeout=0.0)

    def _resync(self) -> None:
        """Changes may have been missed: drop every cached version that is no longer stored."""
        self.registry.resolved.clear()
        for tenant, name, version in self.cache.keys():
            if self.registry.metadata.get(tenant, name, version) is None:
                self.cache.drop((tenant, name, version))

    def _load_weights(self, rec: AdapterRecord):
        """The cache's loader: the record a handle or an rpc already resolved, read from the blob store."""
        return self.registry.load_weights(rec, self.base, self.limits)

    def _view(self, rec: AdapterRecord) -> AdapterView:
        return self._shown(rec, *self.cache.state(_key(rec)))

    def _shown(self, rec: AdapterRecord, state: str, pinned: bool, waiting: int) -> AdapterView:
        device = self.device if state == "DEVICE" else ""
        return AdapterView(rec, state, pinned, waiting, device, self.replica_id)

    def placements(self) -> list[tuple[str, str, str, bool, int]]:
        """(tenant, name@N, tier, pinned, recency) of every version held in memory (tier: device | host),
        for the per-adapter routing gauge."""
        return [
            (tenant, format_ref(name, version), tier, pinned, recency)
            for (tenant, name, version), tier, pinned, recency in self.cache.placements()
        ]

    # ---- rpcs ---------------------------------------------------------------------
    def upload(
        self,
        tenant: str,
        name: str,
        files: dict[str, bytes],
        *,
        description: str = "",
        labels=(),
        source: str = "UPLOAD",
        weights=None,
        record: bytes | None = None,
    ) -> AdapterView:
        """`record`: a fine-tuned version's training record, stored with it (never taken from `files`)."""
        validate_name(name)
        kept = {f: data for f, data in files.items() if f not in IGNORED_FILES}  # e.g. a model card
        if record is not None:
            kept[RECORD_FILE] = record
        # refused before parsing costs anything; the check that counts runs again in the commit
        versions, used = self.registry.metadata.usage(tenant)
        self.quota.check(tenant, versions, used, sum(len(d) for d in kept.values()))
        if weights is None:
            weights = parse_peft_adapter(peft_only(kept), self.base, self.limits, labels)
        rec = self.registry.commit(
            tenant, name, kept, weights, description=description, source=source, quota=self.quota
        )
        self.cache.offer_host(_key(rec), rec, weights)
        return self._view(rec)

    def get(self, tenant: str, ref: str) -> AdapterView:
        return self._view(self.registry.resolve(tenant, ref))

    def list(self, tenant: str, prefix: str = "", all_versions: bool = False) -> list[AdapterView]:
        return [self._view(r) for r in self.registry.list(tenant, prefix, all_versions)]

    def delete(self, tenant: str, ref: str) -> list[AdapterRecord]:
        removed = self.registry.delete(tenant, ref)
        for rec in removed:
            self.cache.drop(_key(rec))
        return removed

    def load(self, tenant: str, ref: str, pin: bool = False, timeout: float = 30.0) -> AdapterView:
        rec = self.registry.resolve(tenant, ref)
        # the state as the load saw it: under traffic another adapter may take the slot a moment later
        state, pinned, waiting = self.cache.request_load(
            _key(rec), rec, pin=pin, timeout=timeout, max_owner_pins=self.max_pins_per_tenant
        )
        return self._shown(rec, state, pinned, waiting)

    def unload(self, tenant: str, ref: str) -> AdapterView:
        rec = self.registry.resolve(tenant, ref)
        self.cache.unload(_key(rec))
        self.registry.metadata.publish(
            RegistryChange("unload", tenant, rec.name, (rec.version,), origin=self.replica_id)
        )
        return self._view(rec)

    def export(self, tenant: str, ref: str) -> tuple[AdapterRecord, dict[str, bytes]]:
        rec = self.registry.resolve(tenant, ref)
        return rec, self.registry.read_files(rec)

    def export_chunks(self, tenant: str, ref: str, chunk_bytes: int) -> Iterator[tuple[str, bytes]]:
        """(file name, chunk) of a stored version, read from disk a chunk at a time."""
        rec = self.registry.resolve(tenant, ref)  # NotFound before the first chunk
        return self.stream_export(peft_files(rec.files), tuple(rec.labels), chunk_bytes)

    def stream_export(
        self, manifest: dict[str, str], labels: tuple[str, ...], chunk_bytes: int
    ) -> Iterator[tuple[str, bytes]]:
        """(file name, chunk) of an adapter's PEFT files (a version's or a job's artifact), then, for a
        head stock PEFT does not reproduce, the README.md that says how to load it."""
        readme = None
        if HEAD_FILE in manifest:
            features = HeadFeatures.from_bytes(
                self.registry.blobs.get(manifest[HEAD_FILE]), self.base.num_layers
            )
            config = self.registry.blobs.get(manifest[CONFIG_FILE]) if CONFIG_FILE in manifest else b"{}"
            readme = export_readme(features, labels, config)
        yield from self.registry.stream_files(manifest, chunk_bytes)
        if readme is not None:
            yield README_FILE, readme

    def training_record(self, rec: AdapterRecord):
        """The TrainingRecord of a resolved version (None if it was not fine-tuned): what it learned from and
        how it scored."""
        from hotlora.adapters.training.training_record import TrainingRecord

        data = self.registry.read_record(rec)
        return None if data is None else TrainingRecord.from_bytes(data)

    def head_features(self, rec: AdapterRecord) -> HeadFeatures | None:
        """What a resolved SEQ_CLS version's head reads (None for CAUSAL_LM): its stored head_config.json,
        or the default when it has none."""
        if rec.task != "SEQ_CLS":
            return None
        sha = rec.files.get(HEAD_FILE)
        if sha is None:
            return HeadFeatures()
        return HeadFeatures.from_bytes(self.registry.blobs.get(sha), self.base.num_layers)

    # ---- inference ------------------------------------------------------------------
    def resolve(self, tenant: str, ref: str) -> tuple[AdapterHandle | None, str]:
        if not ref:
            return None, ""
        rec = self.registry.resolve(tenant, ref)
        return AdapterHandle(rec), rec.ref

    def labels(self, handle: AdapterHandle | None) -> list[str]:
        if handle is None:
            raise FailedPrecondition("the base model has no classification head; name a SEQ_CLS adapter")
        if handle.task != "SEQ_CLS" or not handle.labels:
            raise FailedPrecondition(
                f"adapter {handle.ref} is a {handle.task} adapter without a classification head; "
                "Classify needs a PEFT SEQ_CLS adapter"
            )
        return list(handle.labels)

    def release_unadmitted(self, handle) -> None:
        pass  # slots are taken at admission, so nothing is held before it

    def count_by_state(self) -> dict[str, int]:
        c = self.cache.counts()
        return {
            "stored": self.registry.metadata.count(),
            "device": c["device"],
            "host": c["host"],
            "pinned": c["pinned"],
        }

    def close(self) -> None:
        self.cache.close()
        self.registry.close()


__all__ = ["AdapterHandle", "AdapterService", "AdapterView", "NotFound"]
