"""Wire the adapter side into the loaded model: LoRA sites, runtime, registry, cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from hotlora.adapters.lora_layers import LoraContext, inject_multi_lora, make_lora_sites
from hotlora.adapters.observer import AdapterObserver
from hotlora.adapters.peft.format import AdapterLimits
from hotlora.adapters.runtime import MultiLoraRuntime, SlotContents
from hotlora.adapters.service import AdapterService
from hotlora.adapters.store.s3_blob_store import S3Options
from hotlora.adapters.store.shared_stores import StoreConfig, default_replica_id, open_registry
from hotlora.adapters.store.upload_spool import UploadBudget, UploadSpooler
from hotlora.kernels import native
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


def bank_dtype(
    asked: str, compute: torch.dtype, stored: torch.dtype, device: torch.device, auto_bf16: bool = False
) -> torch.dtype:
    """The LoRA banks' dtype for --adapter-dtype `asked`: auto stores them as the base weights are stored
    (bf16 under --weight-dtype bfloat16, read widened), and in bf16 where --dtype auto keeps a checkpoint's
    GGUF blocks in fp32 on a bf16-capable CPU (`auto_bf16`, Runner.auto_bf16: bf16 there but for the exact
    base; banks read half the bytes, the default model's 32-adapter decode 0.71 -> 0.80 of the base's);
    narrower than the compute dtype only as bf16 under fp32 on a CPU whose LoRA kernel widens them as it
    reads (elsewhere every call would convert a bank)."""
    if asked == "auto":  # auto_bf16: fp32 compute on a CPU, where bf16 banks are read widened
        return torch.bfloat16 if auto_bf16 and native.available() else stored
    want = getattr(torch, asked)
    if want == compute:
        return want
    if want == torch.bfloat16 and compute == torch.float32 and torch.device(device).type == "cpu":
        if not native.available():
            raise ValueError(
                "--adapter-dtype bfloat16 needs hotlora's C LoRA kernel, which cannot run here: "
                f"{native.unavailable_reason() or 'it did not build (see the warning logged)'}"
            )
        return want
    raise ValueError(
        f"--adapter-dtype {asked} under {str(compute).removeprefix('torch.')} compute on {device}: banks "
        "narrower than the compute are bf16 under fp32 on a CPU only"
    )


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
        banks = bank_dtype(
            cfg.adapter_dtype, loaded.dtype, runner.w.stored_dtype, loaded.device, runner.auto_bf16
        )
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
        sites = list(by_key.values())
        per_slot = sum(site.nbytes_per_slot for site in sites)
        log.info(
            "adapter banks: %d slots x rank %d in %s, %.1f MiB a slot, %.0f MiB in all%s",
            cfg.adapter_slots,
            cfg.max_rank,
            str(banks).removeprefix("torch."),
            per_slot / 2**20,
            per_slot * cfg.adapter_slots / 2**20,
            " (--dtype auto on a bf16-capable CPU; --adapter-dtype float32 for exact adapters)"
            if banks != runner.w.stored_dtype and cfg.adapter_dtype == "auto"
            else "",
        )
    else:  # the transformers path: wrap its nn.Linear layers, banks in the model's dtype
        if cfg.adapter_dtype not in ("auto", str(loaded.dtype).removeprefix("torch.")):
            raise ValueError(
                f"--adapter-dtype {cfg.adapter_dtype} needs hotlora's runner, and {loaded.name} is served "
                "through the transformers path"
            )
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
        s3=S3Options(cfg.s3_endpoint_url, cfg.s3_region, cfg.s3_multipart_bytes),
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
