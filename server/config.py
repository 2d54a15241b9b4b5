"""Typed server configuration, one declaration per flag (`server/flags.py` derives the rest).

Every field of `ServerConfig` is a `hotlora serve` flag (`--max-batch-size`) and an environment variable
(`HOTLORA_MAX_BATCH_SIZE`); its type, default, bounds and help are written here once, the checks between
fields in `_check_together`; bad settings fail at start-up with messages that name the flags.
To add a flag: one field below (`name: type = flag(default, help, ge=..)`); see /work/coord/SEAMS.md."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, model_validator

from hotlora.adapters.store.store_urls import check_store_urls
from hotlora.server.flags import ConfigError, add_flags, config_class, config_from, flag

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_data_dir() -> str:
    return os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share")) + "/hotlora"


def default_cache_dir() -> str:
    return os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")) + "/hotlora"


@dataclasses.dataclass(frozen=True)
class MustExist:
    """Marks a path flag that must name an existing file or directory when set. Checked with the checks
    between fields, so `--tls-cert missing.pem` also hears that --tls-key goes with it."""

    kind: Literal["file", "dir", "model"]  # model: a directory, or a .gguf file
    must: str = ""


def _text(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _power_of_two(n: int) -> int:
    if n & (n - 1):
        raise ValueError(f"must be a power of two (got {n})")
    return n


def _absolute_dirs(value: str) -> str:
    for d in (d.strip() for d in value.split(",")):
        if d and (not Path(d).is_absolute() or not Path(d).is_dir()):
            raise ValueError(f"{d!r} is not an absolute path to a directory")
    return value


PathText = Annotated[str, BeforeValidator(_text)]
"""A path, given as text or a PathLike, kept as text."""
ExistingFile = Annotated[PathText, MustExist("file")]
ModelPath = Annotated[PathText, MustExist("model", "must be a local model directory or a .gguf file")]
DirList = Annotated[str, AfterValidator(_absolute_dirs)]
PowerOfTwo = Annotated[int, AfterValidator(_power_of_two)]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error"],
    BeforeValidator(lambda v: v.lower() if isinstance(v, str) else v),
]


@config_class
class ServerConfig:
    model: ModelPath = flag(
        "",
        "local Hugging Face causal-LM directory, or a GGUF file (Llama, Mistral or Qwen2; tensors in F32, "
        "F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K or Q6_K, kept as those blocks); empty = the embedded "
        "SmolLM2-135M-Instruct",
    )
    quantize: Literal["none", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"] = flag(
        "none",
        "quantize the --model checkpoint's weight matrices into GGUF blocks at load, once (cached in "
        "--cache-dir): the projections in this type, the embedding and LM head in Q6_K (Q8_0 under q8_0); "
        "read by hotlora's block kernels in fp32, adapters and heads unchanged (docs/models.md)",
    )
    host: str = flag("127.0.0.1", "address the gRPC port binds to")
    port: int = flag(50051, "gRPC port (0 = pick a free one and log it)", ge=0, le=65535)
    metrics_port: int = flag(
        9400, "Prometheus /metrics HTTP port (0 = pick a free one, -1 = off)", ge=-1, le=65535
    )
    metrics_host: str = flag("", "address the metrics port binds to (empty = same as --host)")
    http_port: int = flag(
        8000,
        "OpenAI-compatible HTTP port (docs/http.md; 0 = pick a free one and log it, -1 = off)",
        ge=-1,
        le=65535,
    )
    http_host: str = flag("", "address the HTTP port binds to (empty = same as --host)")
    http_header_timeout_seconds: float = flag(
        10.0,
        "HTTP door: a request's line and headers must arrive within this (slowloris), else 408 and close",
        gt=0,
    )
    http_body_timeout_seconds: float = flag(
        60.0, "HTTP door: a request's whole body must arrive within this, else 408 and close", gt=0
    )
    served_model_name: str = flag("", "the base model's name in the HTTP door's `model` (empty = its own)")
    allowed_local_adapter_dirs: DirList = flag(
        "",
        "comma-separated server directories POST /v1/load_lora_adapter may read adapters from "
        "(empty = that route refuses every path)",
    )
    vllm_compatible_metrics: bool = flag(
        True, "also export vLLM's gauge names (vllm:num_requests_running, ...) for LoRA-aware routers"
    )
    data_dir: PathText = flag(default_data_dir(), "registry database, adapter blobs and job records")
    cache_dir: PathText = flag(
        default_cache_dir(), "per-user cache of the dequantized default model, shared by data dirs"
    )
    tokens_file: ExistingFile = flag(
        "", "tenant tokens file (see README); empty = single-tenant dev mode, 127.0.0.1 only"
    )
    device: str = flag(
        "auto", "auto | cpu | cuda[:N]", pattern=r"^(auto|cpu|cuda(:\d+)?)$", must="auto, cpu or cuda[:N]"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = flag(
        "auto",
        "auto (bf16 on CUDA and on CPUs with avx512_bf16 or AMX, fp32 elsewhere and for a checkpoint of "
        "exact GGUF blocks on a CPU) "
        "| float32 | float16 | bfloat16",
    )
    weight_dtype: Literal["auto", "float32", "bfloat16"] = flag(
        "auto",
        "auto (the --dtype; under fp32 on a CPU with AVX-512, each matrix whose fp32 values are exactly "
        "those of GGUF Q4_1 or Q8_0 blocks, as a checkpoint dequantized from a GGUF file holds (the default "
        "model is one), is kept as those blocks and read back as the same numbers: 0.19-0.28 of the bytes) "
        "| float32 (every matrix as fp32, and fp32 compute under --dtype auto) | bfloat16: on a CPU with "
        "AVX-512 and --dtype float32, the base model's weights stored in bf16 and widened to fp32 by "
        "hotlora's kernel (half the bytes a decode step reads; numerics are those of the bf16-rounded "
        "weights)",
    )
    adapter_dtype: Literal["auto", "float32", "bfloat16"] = flag(
        "auto",
        "how the adapters' LoRA banks are stored (as vLLM's --lora-dtype): auto (as the base weights: the "
        "--dtype, bf16 under --weight-dtype bfloat16; bf16 where --dtype auto keeps GGUF blocks in fp32 on a "
        "bf16-capable CPU) | float32 (needs fp32 compute, which --dtype auto then is: adapters exact, also "
        "on bf16-stored base weights) | bfloat16: under fp32 compute on a CPU with AVX-512, banks in bf16 "
        "widened to fp32 by the LoRA kernel (half the bytes a many-adapter decode step reads, and twice the "
        "adapters a GiB holds; numerics are those of the bf16-rounded A and B)",
    )
    runner: Literal["auto", "transformers"] = flag(
        "auto",
        "auto (hotlora's runner for Llama, Mistral and Qwen2; transformers for other families) "
        "| transformers",
    )
    kv_cache_bytes: int = flag(
        2 << 30,
        "memory of the paged KV cache (on CPU its pages are committed as tokens fill them)",
        ge=1 << 20,
        must="at least 1 MiB",
    )
    kv_block_size: PowerOfTwo = flag(16, "tokens per KV cache block (a power of two)", ge=1)
    prefix_caching: bool = flag(
        True, "reuse the KV blocks of a prompt prefix already computed for the same tenant and adapter"
    )
    cuda_graphs: bool = flag(
        True,
        "on CUDA, decode steps replay CUDA graphs captured per batch bucket (no effect on CPU, where eager "
        "execution is faster)",
    )
    max_batch_size: int = flag(64, "running generation requests decoded together", ge=1)
    max_queue: int = flag(1024, "waiting requests, all tenants together", ge=1)
    max_queue_per_tenant: int = flag(256, "waiting requests of one tenant", ge=1)
    max_prefill_tokens: int = flag(
        512, "prompt tokens computed in one engine step; longer prompts are chunked across steps", ge=1
    )
    max_prompt_tokens: int = flag(4096, "longest prompt accepted, in tokens", ge=1)
    max_new_tokens: int = flag(1024, "largest max_new_tokens a request may ask for", ge=1)
    default_max_new_tokens: int = flag(128, "max_new_tokens when a request leaves it 0", ge=1)
    max_texts: int = flag(256, "texts in one Embed or Classify request", ge=1)
    max_request_tokens: int = flag(
        8192,
        "tokens of one request, all its texts or prompts together (Embed, Classify, KServe batches)",
        ge=1,
    )
    max_message_bytes: int = flag(64 << 20, "largest gRPC message, each direction", ge=1)
    adapter_slots: int = flag(32, "device slots for adapters (adapters served in one batch)", ge=1)
    max_rank: int = flag(64, "largest LoRA rank accepted", ge=1)
    host_cache_bytes: int = flag(2 << 30, "host memory for adapters that are not in a device slot", ge=0)
    max_upload_bytes: int = flag(512 << 20, "largest adapter upload, all files together", ge=1)
    upload_buffer_bytes: int = flag(
        1 << 30, "bytes of all uploads in flight together (received, not yet stored); more are refused", ge=1
    )
    max_adapters_per_tenant: int = flag(1000, "stored adapter versions per tenant", ge=1)
    max_tenant_bytes: int = flag(16 << 30, "stored adapter bytes per tenant (all versions' files)", ge=1)
    max_pins_per_tenant: int = flag(
        0,
        "device slots one tenant may pin; 0 = a quarter of --adapter-slots (dev mode: all of them)",
        ge=0,
        must="0 (automatic) or more",
    )
    target_modules: str = flag(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "linear layers that can carry LoRA"
    )
    train_share: float = flag(
        0.2, "largest share of engine time given to fine-tuning while serving", gt=0, le=1
    )
    train_idle_grace_ms: float = flag(
        50.0,
        "fine-tuning uses an idle engine only this long after the last serving step (a client's next "
        "request then does not wait behind a training unit); 0 = at once",
        ge=0,
        le=10_000,
    )
    max_jobs: int = flag(2, "fine-tune jobs queued or running, all tenants", ge=1)
    max_jobs_per_tenant: int = flag(1, "fine-tune jobs queued or running per tenant", ge=1)
    max_finetune_examples: int = flag(10_000, "training plus validation examples in one fine-tune job", ge=1)
    max_finetune_example_tokens: int = flag(
        512, "tokens of one fine-tune example (prompt + completion)", ge=1
    )
    max_train_unit_ms: float = flag(
        50.0,
        "longest engine time of one training unit; it ends mid-pass, at a layer, once this is spent",
        gt=0,
    )
    finetune_max_seconds: float = flag(
        600.0, "time budget of a fine-tune's method search (AUTO) when the request gives none", gt=0
    )
    session_idle_seconds: float = flag(
        600.0,
        "a Tinker API session with no heartbeat or call this long ends: its training clients' state is "
        "dropped (saved checkpoints are kept)",
        gt=0,
    )
    tinker_max_runs_per_tenant: int = flag(4, "live Tinker training clients of one tenant", ge=1)
    tinker_max_bytes_per_tenant: int = flag(
        2 << 30, "host memory of one tenant's live Tinker training clients (weights, gradients, AdamW)", ge=1
    )
    tinker_max_batch_tokens: int = flag(16384, "tokens of one Tinker forward_backward call", ge=1)
    tinker_unembed: Literal["refuse", "without"] = flag(
        "refuse",
        "a Tinker training client asking train_unembed=True (the SDK's default; there is no LM head LoRA "
        "yet): refuse = refused with a message, without = trains attention and MLP only, every session "
        "warned",
    )
    reflection: bool = flag(True, "serve gRPC server reflection")
    grace_seconds: float = flag(20.0, "on SIGTERM, how long in-flight requests may finish", ge=0)
    workers: int = flag(64, "gRPC handler threads", ge=1)
    max_concurrent_rpcs: int = flag(
        0,
        "rpcs in flight, all tenants (running or waiting for a handler thread); 0 = 4 x --workers",
        ge=0,
        must="0 (automatic) or more",
    )
    max_rpcs_per_tenant: int = flag(
        0,
        "rpcs one tenant may have in flight; 0 = a quarter of --workers (dev mode: no per-tenant cap)",
        ge=0,
        must="0 (automatic) or more",
    )
    max_stream_requests: int = flag(16, "requests in flight on one KServe ModelStreamInfer stream", ge=1)
    request_idle_seconds: float = flag(
        60.0, "longest wait for a client's next message (request body, upload chunk, stream request)", gt=0
    )
    keepalive_seconds: float = flag(60.0, "server keepalive ping interval on each connection", gt=0)
    keepalive_timeout_seconds: float = flag(
        20.0, "a connection whose keepalive ping is unanswered this long is closed", gt=0
    )
    connection_idle_seconds: float = flag(
        600.0, "a connection with no rpc for this long is closed (GOAWAY)", gt=0
    )
    connection_max_age_seconds: float = flag(
        3600.0,
        "a connection older than this is asked to reconnect (GOAWAY); 0 = no limit",
        ge=0,
        must="0 (no limit) or more",
    )
    connection_age_grace_seconds: float = flag(
        60.0, "rpcs still running on a too-old connection are cut off after this grace", gt=0
    )
    registry_connections: int = flag(
        8, "connections of the registry pool (SQLite or PostgreSQL), shared by all threads", ge=1
    )
    registry: str = flag(
        "", "adapter metadata: empty = SQLite under --data-dir; postgresql://... = shared by a fleet"
    )
    blob_store: str = flag(
        "", "adapter files: empty = a directory under --data-dir; s3://bucket/prefix = shared by a fleet"
    )
    s3_endpoint_url: str = flag("", "S3-compatible endpoint (MinIO, Ceph); empty = AWS_ENDPOINT_URL or AWS")
    s3_region: str = flag("", "S3 region; empty = AWS_REGION / AWS_DEFAULT_REGION")
    s3_multipart_bytes: int = flag(
        64 << 20,
        "blobs this large or larger are uploaded to S3 in parts of this size",
        ge=5 << 20,
        must="at least 5 MiB, S3's smallest part",
    )
    job_lease_seconds: float = flag(
        30.0,
        "shared registry: a replica that stops renewing a job's lease this long has the job failed",
        ge=1,
    )
    replica_id: str = flag("", "this replica's name in the shared registry; empty = host-pid-random")
    health_check_seconds: float = flag(
        5.0, "how often the registry is probed; health NOT_SERVING when it fails", gt=0
    )
    registry_timeout_seconds: float = flag(
        5.0,
        "shared registry: the longest a PostgreSQL call or an S3 wait may take before UNAVAILABLE "
        "(a request's own deadline, when sooner, bounds it too)",
        ge=0.1,
        le=600,
    )
    tls_cert: ExistingFile = flag("", "PEM server certificate (enables TLS)")
    tls_key: ExistingFile = flag("", "PEM server private key")
    tls_client_ca: ExistingFile = flag("", "PEM CA that client certificates must chain to (enables mTLS)")
    expose_adapter_names: bool = flag(
        False, "list running/waiting adapter names (tenant/name@N, top 16) in hotlora_lora_requests_info"
    )
    adapter_metrics: bool = flag(
        False,
        "per-adapter series on /metrics: which versions are loaded where (device/host, pinned), requests, "
        "tokens and latency per adapter; they carry tenants' adapter names, so keep the metrics port private "
        "(implies --expose-adapter-names)",
    )
    adapter_metrics_cap: int = flag(
        1000,
        "most adapters with series of their own under --adapter-metrics; the rest count as (other)",
        ge=1,
    )
    log_level: LogLevel = flag("info", "debug | info | warning | error")
    log_format: Literal["text", "json"] = flag("text", "text | json")

    @model_validator(mode="after")
    def _check_together(self):
        """What no single flag's bounds can say; every problem at once, one a line."""
        problems = _missing_paths(self)
        if self.default_max_new_tokens > self.max_new_tokens:
            problems.append("--default-max-new-tokens cannot exceed --max-new-tokens")
        if self.max_request_tokens < self.max_prompt_tokens:
            problems.append("--max-request-tokens cannot be below --max-prompt-tokens")
        if self.upload_buffer_bytes < self.max_upload_bytes:
            problems.append("--upload-buffer-bytes cannot be below --max-upload-bytes (one upload must fit)")
        ports = {"--port": self.port, "--metrics-port": self.metrics_port, "--http-port": self.http_port}
        for a, b in (
            ("--port", "--metrics-port"),
            ("--port", "--http-port"),
            ("--metrics-port", "--http-port"),
        ):
            if ports[a] > 0 and ports[a] == ports[b]:
                problems.append(f"{a} and {b} must differ (both {ports[a]}; 0 takes a free one for each)")
        problems += _precision_problems(self)
        problems += _quantize_problems(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        if not self.tokens_file:
            for name, host in (
                ("--host", self.host),
                ("--metrics-host", self.metrics_host or self.host),
                ("--http-host", self.http_host or self.host),
            ):
                if host not in LOOPBACK:
                    problems.append(
                        "without --tokens-file the server runs in single-tenant dev mode and listens on "
                        f"127.0.0.1 only; give a tokens file to bind {host!r} ({name})"
                    )
        problems += check_store_urls(self.registry, self.blob_store)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def rpc_limit(self) -> int:
        """--max-concurrent-rpcs resolved."""
        return self.max_concurrent_rpcs or 4 * self.workers

    @property
    def tenant_rpc_limit(self) -> int | None:
        """--max-rpcs-per-tenant resolved; None = no per-tenant cap (dev mode has one tenant)."""
        if self.max_rpcs_per_tenant:
            return self.max_rpcs_per_tenant
        return max(1, self.workers // 4) if self.tokens_file else None

    @property
    def tenant_pin_limit(self) -> int:
        """--max-pins-per-tenant resolved."""
        if self.max_pins_per_tenant:
            return self.max_pins_per_tenant
        return max(1, self.adapter_slots // 4) if self.tokens_file else self.adapter_slots

    @property
    def allowed_local_adapter_dir_list(self) -> tuple[str, ...]:
        return tuple(d.strip() for d in self.allowed_local_adapter_dirs.split(",") if d.strip())

    @property
    def target_module_list(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.target_modules.split(",") if m.strip())


def _precision_problems(cfg: ServerConfig) -> list[str]:
    """--dtype, --weight-dtype and --adapter-dtype that cannot go together."""
    problems = []
    if cfg.weight_dtype == "bfloat16" and cfg.dtype in ("float16", "bfloat16"):
        problems.append("--weight-dtype bfloat16 widens to fp32: it needs --dtype float32 (or auto)")
    elif cfg.weight_dtype == "bfloat16" and cfg.runner == "transformers":
        problems.append("--weight-dtype bfloat16 needs hotlora's runner, not --runner transformers")
    if cfg.adapter_dtype != "auto" and cfg.runner == "transformers":
        problems.append("--adapter-dtype needs hotlora's runner, not --runner transformers")
    elif cfg.adapter_dtype == "float32" and cfg.dtype in ("float16", "bfloat16"):
        problems.append(f"--adapter-dtype float32 needs fp32 compute, not --dtype {cfg.dtype}")
    elif cfg.adapter_dtype == "bfloat16" and cfg.dtype == "float16":
        problems.append("--adapter-dtype bfloat16 needs fp32 or bf16 compute, not --dtype float16")
    return problems


def _is_gguf_file(path: str) -> bool:
    return Path(path).is_file() and path.lower().endswith(".gguf")


def _quantize_problems(cfg: ServerConfig) -> list[str]:
    """--quantize with what cannot serve its blocks."""
    if cfg.quantize == "none":
        return []
    if cfg.model and _is_gguf_file(cfg.model):
        return [f"--quantize {cfg.quantize}: --model is a GGUF file, quantized already"]
    for bad, why in (
        (cfg.runner == "transformers", "--runner transformers"),
        (cfg.dtype in ("float16", "bfloat16"), f"--dtype {cfg.dtype} (the block kernels compute in fp32)"),
        (cfg.weight_dtype != "auto", f"--weight-dtype {cfg.weight_dtype}"),
        (cfg.device.startswith("cuda"), "--device cuda (the block kernels are the CPU's)"),
    ):
        if bad:
            return [f"--quantize {cfg.quantize} cannot go with {why}"]
    return []


def _missing_paths(cfg) -> list[str]:
    """The `MustExist` flags set to a path that is not there."""
    problems = []
    for name, info in type(cfg).__pydantic_fields__.items():
        path = getattr(cfg, name)
        for mark in (m for m in info.metadata if isinstance(m, MustExist)):
            flag_ = "--" + name.replace("_", "-")
            if not path:
                continue
            if mark.kind == "file" and not Path(path).is_file():
                problems.append(f"{flag_}: no such file {path!r}")
            elif mark.kind == "dir" and not Path(path).is_dir():
                problems.append(f"{flag_} {mark.must or 'must be a directory'}; {path!r} is not one")
            elif mark.kind == "model" and not (Path(path).is_dir() or _is_gguf_file(path)):
                problems.append(f"{flag_} {mark.must}; {path!r} is not one")
    return problems


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`hotlora serve`'s flags on `parser`."""
    add_flags(parser, ServerConfig)


def config_from_args(args: argparse.Namespace | None = None, environ=None) -> ServerConfig:
    """Flag > HOTLORA_<FLAG> > default. Raises ConfigError (a ValueError) naming each bad flag."""
    return config_from(ServerConfig, args, environ)


__all__ = ["ConfigError", "ServerConfig", "add_config_arguments", "config_from_args", "LOOPBACK"]
