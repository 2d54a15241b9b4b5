"""Wire the adapter side into the loaded model: LoRA sites, runtime, registry, cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hotlora.adapters.lora_layers import LoraContext, inject_multi_lora, make_lora_sites
from hotlora.adapters.observer import AdapterObserver
from hotlora.adapters.peft.format import AdapterLimits
from hotlora.adapters.runtime import MultiLoraRuntime, SlotContents
from hotlora.adapters.service import AdapterService
from hotlora.adapters.store.s3_blob_store import S3Options
from hotlora.adapters.store.shared_stores import StoreConfig, default_replica_id, open_registry
from hotlora.adapters.store.upload_spool import UploadBudget, UploadSpooler
from hotlora.server.config import ServerConfig
from hotlora.server.engine.runner import FUSED
from hotlora.server.model_loading import LoadedModel

log = logging.getLogger("hotlora.adapters")
UPLOADS_DIR = "uploads-in-flight"  # under --data-dir: spools of uploads not yet stored


@dataclass(frozen=True)
class AdapterSide:
    """The adapter tier wired into one loaded model: what the engine, the doors and training need of it."""

    runtime: MultiLoraRuntime
    """Device slots and the per-step LoRA plan (the engine's `runtime`)."""
    service: AdapterService
    """Registry + cache: what the Adapters door and requests resolve adapters through."""
    lora_context: LoraContext
    """The multi-LoRA layers' shared context; fine-tuning trains through it."""
    targets: tuple[str, ...]
    """The PEFT module names adapters may target on this model, sorted."""


def _attach_base_weights(runner, sites) -> None:
    """Each site's projection weight (read densely, at a DoRA adapter's install only) and bias."""
    from functools import partial

    for (layer, proj), site in sites.items():
        weights = runner.w.layers[layer]
        site.attach_base(partial(_dense, getattr(weights, proj)), getattr(weights, f"{proj}_bias"))


def _dense(matrix):
    """A projection's weight as a float32 [out, in] tensor, whatever its storage (blocks widened, a RowStack's
    parts stacked)."""
    import torch

    from hotlora.kernels import block_weights
    from hotlora.server.engine.runner.weights import RowStack

    if isinstance(matrix, RowStack):  # parts in different block formats, stacked by rows
        return torch.cat([_dense(part) for part in matrix.parts])
    if block_weights.is_packed(matrix):
        return block_weights.widen(matrix)
    return matrix.to(torch.float32)


def setup_adapters(cfg: ServerConfig, loaded: LoadedModel, observer: AdapterObserver) -> AdapterSide:
    base = loaded.base
    targets = [t for t in cfg.target_module_list if t in base.linear_shapes]
    if not targets:
        raise ValueError(
            f"--target-modules {cfg.target_modules!r} names no linear layer of this model "
            f"(it has {', '.join(sorted(base.linear_shapes))})"
        )
    runner = loaded.model
    if loaded.runner_kind == "runner":
        shapes = runner.projection_shapes()
        layout = {proj: (shapes[proj][0], FUSED[proj], shapes[proj][1]) for proj in FUSED}
        banks = loaded.precision.banks  # server/precision.py decided them with the rest
        ctx, by_key = make_lora_sites(
            layout,
            base.num_layers,
            targets,
            cfg.adapter_slots,
            cfg.max_rank,
            loaded.device,
            banks,
            loaded.dtype,
        )
        runner.sites = by_key
        _attach_base_weights(runner, by_key)
        sites = list(by_key.values())
        per_slot = sum(site.nbytes_per_slot for site in sites)
        log.info(
            "adapter banks: %d slots x rank %d in %s (the precision's), %.1f MiB a slot, %.0f MiB in all",
            cfg.adapter_slots,
            cfg.max_rank,
            str(banks).removeprefix("torch."),
            per_slot / 2**20,
            per_slot * cfg.adapter_slots / 2**20,
        )
    else:  # the transformers path: wrap its nn.Linear layers, banks in the model's dtype
        ctx, wrapped = inject_multi_lora(runner.model, targets, cfg.adapter_slots, cfg.max_rank)
        runner.lora_ctx = ctx
        sites = list(wrapped.values())
    slots = SlotContents(sites, cfg.adapter_slots, loaded.device, loaded.dtype)
    limits = AdapterLimits(
        max_rank=cfg.max_rank, max_file_bytes=cfg.max_upload_bytes, max_upload_bytes=cfg.max_upload_bytes
    )
    stores = StoreConfig(
        data_dir=Path(cfg.data_dir),
        registry=cfg.registry,
        blob_store=cfg.blob_store,
        connections=cfg.registry_connections,
        job_lease_s=cfg.job_lease_seconds,
        replica_id=cfg.replica_id or default_replica_id(),
        timeout_s=cfg.registry_timeout_seconds,
        s3=S3Options(
            cfg.s3_endpoint_url, cfg.s3_region, cfg.s3_multipart_bytes, timeout_s=cfg.registry_timeout_seconds
        ),
    )
    registry = open_registry(stores)
    service = AdapterService(
        registry,
        base,
        limits,
        slots,
        cfg.host_cache_bytes,
        max_per_tenant=cfg.max_adapters_per_tenant,
        observer=observer,
        max_tenant_bytes=cfg.max_tenant_bytes,
        max_pins_per_tenant=cfg.tenant_pin_limit,
        replica_id=stores.replica_id,
        uploads=UploadSpooler(
            Path(cfg.data_dir) / UPLOADS_DIR, UploadBudget(cfg.upload_buffer_bytes), cfg.max_upload_bytes
        ),
    )
    runtime = MultiLoraRuntime(ctx, slots, service.cache, cfg.max_rank)
    return AdapterSide(runtime, service, ctx, tuple(sorted(targets)))
