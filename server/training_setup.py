"""Wire on-line fine-tuning to the loaded model, the engine and the adapter registry."""

from __future__ import annotations

from hotlora.adapters.finetune_jobs import FineTuneManager
from hotlora.adapters.finetune_spec import FineTuneLimits


def setup_training(state) -> FineTuneManager | None:
    adapters = state.adapters
    if adapters is None or getattr(adapters, "lora_context", None) is None:
        return None  # no multi-LoRA layers: nothing to train on
    cfg = state.config
    loaded = state.loaded
    targets = adapters.targets
    limits = FineTuneLimits(max_examples=cfg.max_finetune_examples, max_rank=cfg.max_rank)
    return FineTuneManager(
        store=adapters.registry.metadata,
        adapters=adapters,
        engine=state.engine,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        ctx=adapters.lora_context,
        base=adapters.base,
        targets=targets,
        limits=limits,
        max_jobs=cfg.max_jobs,
        max_jobs_per_tenant=cfg.max_jobs_per_tenant,
        max_example_tokens=cfg.max_finetune_example_tokens,
        unit_seconds=cfg.max_train_unit_ms / 1000.0,
        max_seconds=cfg.finetune_max_seconds,
        base_model_name=getattr(adapters, "base_model_name", ""),
        metrics=state.metrics,
    )
