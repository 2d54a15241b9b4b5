"""Assembly: build the serving stack for one config, in dependency order, and return it typed.

model -> adapter tier (LoRA sites, runtime, registry, cache) -> engine -> frontend -> fine-tuning. The process
around it (ports, health, signals, shutdown) is `server.app.HotloraServer`; it calls `assemble` once the port
is bound, because loading the model takes seconds to minutes and probes must see NOT_SERVING meanwhile."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hotlora.adapters.observer import NO_OBSERVER, Observer
from hotlora.adapters.runtime import MultiLoraRuntime
from hotlora.adapters.service import AdapterService
from hotlora.adapters.training.finetune_jobs import FineTuneManager
from hotlora.server.adapters_setup import setup_adapters
from hotlora.server.config import ServerConfig
from hotlora.server.engine.runner.decode_graphs import StaticDecode
from hotlora.server.engine.scheduler import Engine, EngineLimits
from hotlora.server.frontend.inference import InferenceFrontend
from hotlora.server.logs import startup_phase
from hotlora.server.model_loading import LoadedModel, load_model
from hotlora.server.tinker.service import TinkerService
from hotlora.server.training_setup import setup_tinker, setup_training


@dataclass(frozen=True)
class Components:
    """The serving stack of one loaded model; the engine is running."""

    loaded: LoadedModel
    engine: Engine
    frontend: InferenceFrontend
    adapters: AdapterService
    training: FineTuneManager
    tinker: TinkerService


def assemble(config: ServerConfig, observer: Observer = NO_OBSERVER) -> Components:
    """Load the model and build everything that needs it; `observer` hears the cache, the engine and jobs."""
    cfg = config
    with startup_phase("model load", announce=True) as phase:
        loaded = load_model(
            cfg.model,
            cfg.cache_dir,
            cfg.device,
            cfg.dtype,
            kv_cache_bytes=cfg.kv_cache_bytes,
            kv_block_size=cfg.kv_block_size,
            runner=cfg.runner,
            weight_dtype=cfg.weight_dtype,
            adapter_dtype=cfg.adapter_dtype,
            quantize=cfg.quantize,
        )
        phase.note = f"{loaded.name} on {loaded.device}/{loaded.dtype}"
    if not cfg.prefix_caching:
        loaded.model.kv_config = dataclasses.replace(loaded.model.kv_config, prefix_caching=False)
    with startup_phase("adapter banks") as phase:
        adapters = setup_adapters(cfg, loaded, observer)
        phase.note = f"{cfg.adapter_slots} slots of rank up to {cfg.max_rank}"
    with startup_phase("engine"):
        limits = EngineLimits(
            cfg.max_batch_size, cfg.max_queue, cfg.max_queue_per_tenant, cfg.max_prefill_tokens
        )
        engine = Engine(
            loaded.model,
            loaded.tokenizer,
            limits=limits,
            runtime=adapters.runtime,
            observer=observer,
            task_share=cfg.train_share,
            static_decode=_decode_graphs(cfg, loaded, adapters.runtime),
            task_idle_grace_s=cfg.train_idle_grace_ms / 1000.0,
        )
        engine.start()
    try:
        with startup_phase("doors and fine-tuning"):
            frontend = InferenceFrontend(engine, loaded.tokenizer, cfg, adapters.service)
            training = setup_training(cfg, loaded, adapters, engine, observer)
            tinker = setup_tinker(cfg, loaded, adapters, frontend, training)
    except BaseException:
        engine.stop()  # nothing else holds it yet
        raise
    return Components(loaded, engine, frontend, adapters.service, training, tinker)


def _decode_graphs(cfg: ServerConfig, loaded: LoadedModel, runtime: MultiLoraRuntime) -> StaticDecode | None:
    """Static decode steps: CUDA graphs on a CUDA device with hotlora's runner, unless --no-cuda-graphs."""
    if not cfg.cuda_graphs or loaded.device.type != "cuda" or loaded.runner_kind != "runner":
        return None
    return StaticDecode(loaded.model, capture=True, lora_plan=runtime.graph_plan)
