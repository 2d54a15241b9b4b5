"""Wire on-line fine-tuning (jobs, and the Tinker API's training loops) to the loaded model, the engine and
the adapter registry."""

from __future__ import annotations

from pathlib import Path

from hotlora.adapters.observer import AdapterObserver
from hotlora.adapters.training.finetune_jobs import FineTuneManager
from hotlora.adapters.training.finetune_spec import FineTuneLimits
from hotlora.server.adapters_setup import AdapterSide
from hotlora.server.config import ServerConfig
from hotlora.server.engine.scheduler import Engine
from hotlora.server.model_loading import LoadedModel
from hotlora.server.tinker.service import TinkerService


def setup_training(
    cfg: ServerConfig, loaded: LoadedModel, adapters: AdapterSide, engine: Engine, observer: AdapterObserver
) -> FineTuneManager:
    limits = FineTuneLimits(max_examples=cfg.max_finetune_examples, max_rank=cfg.max_rank)
    service = adapters.service
    return FineTuneManager(
        store=service.registry.metadata,
        adapters=service,
        engine=engine,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        ctx=adapters.lora_context,
        base=service.base,
        targets=adapters.targets,
        limits=limits,
        max_jobs=cfg.max_jobs,
        max_jobs_per_tenant=cfg.max_jobs_per_tenant,
        max_example_tokens=cfg.max_finetune_example_tokens,
        unit_seconds=cfg.max_train_unit_ms / 1000.0,
        max_seconds=cfg.finetune_max_seconds,
        base_model_name=loaded.name,
        observer=observer,
    )


def setup_tinker(
    cfg: ServerConfig, loaded: LoadedModel, adapters: AdapterSide, frontend, training: FineTuneManager
) -> TinkerService:
    """The Tinker API's sessions and training runs: units in the jobs' fair queue, samples on the engine."""
    return TinkerService(
        config=cfg,
        loaded=loaded,
        adapters=adapters.service,
        frontend=frontend,
        queue=training.queue,
        base=adapters.service.base,
        ctx=adapters.lora_context,
        targets=adapters.targets,
        data_dir=Path(cfg.data_dir) / "tinker",
    )
