"""Wire the adapter side into the loaded model: multi-LoRA layers, runtime, registry, cache."""

from __future__ import annotations

from pathlib import Path

from hotlora.adapters.base_model_info import BaseModelInfo
from hotlora.adapters.lora_layers import inject_multi_lora
from hotlora.adapters.peft_format import AdapterLimits
from hotlora.adapters.registry import AdapterRegistry
from hotlora.adapters.runtime import MultiLoraRuntime
from hotlora.adapters.service import AdapterService
from hotlora.adapters.upload_spool import UploadBudget, UploadSpooler

UPLOADS_DIR = "uploads-in-flight"  # under --data-dir: spools of uploads not yet stored


def setup_adapters(state, loaded):
    cfg = state.config
    model = loaded.model
    base = BaseModelInfo.from_model(model)  # before injection: plain nn.Linear shapes
    targets = [t for t in cfg.target_module_list if t in base.linear_shapes]
    if not targets:
        raise ValueError(
            f"--target-modules {cfg.target_modules!r} names no linear layer of this model "
            f"(it has {', '.join(sorted(base.linear_shapes))})"
        )
    ctx, wrapped = inject_multi_lora(model, targets, cfg.adapter_slots, cfg.max_rank)
    runtime = MultiLoraRuntime(ctx, wrapped, cfg.adapter_slots, loaded.device, loaded.dtype)
    limits = AdapterLimits(
        max_rank=cfg.max_rank, max_file_bytes=cfg.max_upload_bytes, max_upload_bytes=cfg.max_upload_bytes
    )
    registry = AdapterRegistry.open(Path(cfg.data_dir), cfg.registry_connections)
    service = AdapterService(
        registry,
        base,
        limits,
        runtime,
        cfg.adapter_slots,
        cfg.host_cache_bytes,
        max_per_tenant=cfg.max_adapters_per_tenant,
        observer=state.metrics,
        max_tenant_bytes=cfg.max_tenant_bytes,
        max_pins_per_tenant=cfg.tenant_pin_limit,
        uploads=UploadSpooler(
            Path(cfg.data_dir) / UPLOADS_DIR, UploadBudget(cfg.upload_buffer_bytes), cfg.max_upload_bytes
        ),
    )
    service.base_model_name = loaded.name
    service.lora_context = ctx
    service.wrapped = wrapped
    return runtime, service
