"""Typed server configuration. Every field is a `hotlora serve` flag (`--max-batch-size`)
and an environment variable (`HOTLORA_MAX_BATCH_SIZE`); bad settings fail at start-up."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from hotlora.adapters.store.shared_stores import check_store_urls

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def default_data_dir() -> str:
    return os.environ.get("XDG_DATA_HOME", str(Path.home() / ".local" / "share")) + "/hotlora"


def default_cache_dir() -> str:
    return os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")) + "/hotlora"


@dataclass
class ServerConfig:
    model: str = _opt(
        "", "local Hugging Face causal-LM directory; empty = the embedded SmolLM2-135M-Instruct"
    )
    host: str = _opt("127.0.0.1", "address the gRPC port binds to")
    port: int = _opt(50051, "gRPC port (0 = pick a free one and log it)")
    metrics_port: int = _opt(9400, "Prometheus /metrics HTTP port (0 = pick a free one, -1 = off)")
    metrics_host: str = _opt("", "address the metrics port binds to (empty = same as --host)")
    http_port: int = _opt(
        8000, "OpenAI-compatible HTTP port (docs/http.md; 0 = pick a free one and log it, -1 = off)"
    )
    http_host: str = _opt("", "address the HTTP port binds to (empty = same as --host)")
    served_model_name: str = _opt("", "the base model's name in the HTTP door's `model` (empty = its own)")
    allowed_local_adapter_dirs: str = _opt(
        "",
        "comma-separated server directories POST /v1/load_lora_adapter may read adapters from "
        "(empty = that route refuses every path)",
    )
    vllm_compatible_metrics: bool = _opt(
        True, "also export vLLM's gauge names (vllm:num_requests_running, ...) for LoRA-aware routers"
    )
    data_dir: str = _opt(default_data_dir(), "registry database, adapter blobs and job records")
    cache_dir: str = _opt(
        default_cache_dir(), "per-user cache of the dequantized default model, shared by data dirs"
    )
    tokens_file: str = _opt(
        "", "tenant tokens file (see README); empty = single-tenant dev mode, 127.0.0.1 only"
    )
    device: str = _opt("auto", "auto | cpu | cuda[:N]", choices=("auto", "cpu", "cuda"))
    dtype: str = _opt(
        "auto",
        "auto (bf16 on CUDA and on CPUs with avx512_bf16 or AMX, fp32 elsewhere and for a checkpoint of "
        "exact GGUF blocks on a CPU) "
        "| float32 | float16 | bfloat16",
    )
    weight_dtype: str = _opt(
        "auto",
        "auto (the --dtype; under fp32 on a CPU with AVX-512, each matrix whose fp32 values are exactly "
        "those of GGUF Q4_1 or Q8_0 blocks, as a checkpoint dequantized from a GGUF file holds (the default "
        "model is one), is kept as those blocks and read back as the same numbers: 0.19-0.28 of the bytes) "
        "| float32 (every matrix as fp32, and fp32 compute under --dtype auto) | bfloat16: on a CPU with "
        "AVX-512 and --dtype float32, the base model's weights stored in bf16 and widened to fp32 by "
        "hotlora's kernel (half the bytes a decode step reads; numerics are those of the bf16-rounded "
        "weights)",
        choices=("auto", "float32", "bfloat16"),
    )
    adapter_dtype: str = _opt(
        "auto",
        "how the adapters' LoRA banks are stored (as vLLM's --lora-dtype): auto (as the base weights: the "
        "--dtype, bf16 under --weight-dtype bfloat16; bf16 where --dtype auto keeps GGUF blocks in fp32 on a "
        "bf16-capable CPU) | float32 (needs fp32 compute, which --dtype auto then is: adapters exact, also "
        "on bf16-stored base weights) | bfloat16: under fp32 compute on a CPU with AVX-512, banks in bf16 "
        "widened to fp32 by the LoRA kernel (half the bytes a many-adapter decode step reads, and twice the "
        "adapters a GiB holds; numerics are those of the bf16-rounded A and B)",
        choices=("auto", "float32", "bfloat16"),
    )
    runner: str = _opt(
        "auto",
        "auto (hotlora's runner for Llama, Mistral and Qwen2; transformers for other families) "
        "| transformers",
        choices=("auto", "transformers"),
    )
    kv_cache_bytes: int = _opt(
        2 << 30, "memory of the paged KV cache (on CPU its pages are committed as tokens fill them)"
    )
    kv_block_size: int = _opt(16, "tokens per KV cache block (a power of two)")
    prefix_caching: bool = _opt(
        True, "reuse the KV blocks of a prompt prefix already computed for the same tenant and adapter"
    )
    cuda_graphs: bool = _opt(
        True,
        "on CUDA, decode steps replay CUDA graphs captured per batch bucket (no effect on CPU, where eager "
        "execution is faster)",
    )
    torch_compile: bool = _opt(
        False,
        "on CPU, decode steps run through torch.compile (inductor; hotlora's C kernels as custom ops), "
        "compiled on a background thread after start-up while steps run eagerly; needs hotlora's runner in "
        "float32. Off by default: on a 2-core CPU it measured 0.89-1.00x eager (docs/engine.md)",
    )
    max_batch_size: int = _opt(64, "running generation requests decoded together")
    max_queue: int = _opt(1024, "waiting requests, all tenants together")
    max_queue_per_tenant: int = _opt(256, "waiting requests of one tenant")
    max_prefill_tokens: int = _opt(
        512, "prompt tokens computed in one engine step; longer prompts are chunked across steps"
    )
    max_prompt_tokens: int = _opt(4096, "longest prompt accepted, in tokens")
    max_new_tokens: int = _opt(1024, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = _opt(128, "max_new_tokens when a request leaves it 0")
    max_texts: int = _opt(256, "texts in one Embed or Classify request")
    max_request_tokens: int = _opt(
        8192, "tokens of one request, all its texts or prompts together (Embed, Classify, KServe batches)"
    )
    max_message_bytes: int = _opt(64 << 20, "largest gRPC message, each direction")
    adapter_slots: int = _opt(32, "device slots for adapters (adapters served in one batch)")
    max_rank: int = _opt(64, "largest LoRA rank accepted")
    host_cache_bytes: int = _opt(2 << 30, "host memory for adapters that are not in a device slot")
    max_upload_bytes: int = _opt(512 << 20, "largest adapter upload, all files together")
    upload_buffer_bytes: int = _opt(
        1 << 30, "bytes of all uploads in flight together (received, not yet stored); more are refused"
    )
    max_adapters_per_tenant: int = _opt(1000, "stored adapter versions per tenant")
    max_tenant_bytes: int = _opt(16 << 30, "stored adapter bytes per tenant (all versions' files)")
    max_pins_per_tenant: int = _opt(
        0, "device slots one tenant may pin; 0 = a quarter of --adapter-slots (dev mode: all of them)"
    )
    target_modules: str = _opt(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "linear layers that can carry LoRA"
    )
    train_share: float = _opt(0.2, "largest share of engine time given to fine-tuning while serving")
    train_idle_grace_ms: float = _opt(
        50.0,
        "fine-tuning uses an idle engine only this long after the last serving step (a client's next "
        "request then does not wait behind a training unit); 0 = at once",
    )
    max_jobs: int = _opt(2, "fine-tune jobs queued or running, all tenants")
    max_jobs_per_tenant: int = _opt(1, "fine-tune jobs queued or running per tenant")
    max_finetune_examples: int = _opt(10_000, "training plus validation examples in one fine-tune job")
    max_finetune_example_tokens: int = _opt(512, "tokens of one fine-tune example (prompt + completion)")
    max_train_unit_ms: float = _opt(
        50.0, "longest engine time of one training unit; it ends mid-pass, at a layer, once this is spent"
    )
    finetune_max_seconds: float = _opt(
        600.0, "time budget of a fine-tune's method search (AUTO) when the request gives none"
    )
    reflection: bool = _opt(True, "serve gRPC server reflection")
    grace_seconds: float = _opt(20.0, "on SIGTERM, how long in-flight requests may finish")
    workers: int = _opt(64, "gRPC handler threads")
    max_concurrent_rpcs: int = _opt(
        0, "rpcs in flight, all tenants (running or waiting for a handler thread); 0 = 4 x --workers"
    )
    max_rpcs_per_tenant: int = _opt(
        0, "rpcs one tenant may have in flight; 0 = a quarter of --workers (dev mode: no per-tenant cap)"
    )
    max_stream_requests: int = _opt(16, "requests in flight on one KServe ModelStreamInfer stream")
    request_idle_seconds: float = _opt(
        60.0, "longest wait for a client's next message (request body, upload chunk, stream request)"
    )
    keepalive_seconds: float = _opt(60.0, "server keepalive ping interval on each connection")
    keepalive_timeout_seconds: float = _opt(
        20.0, "a connection whose keepalive ping is unanswered this long is closed"
    )
    connection_idle_seconds: float = _opt(600.0, "a connection with no rpc for this long is closed (GOAWAY)")
    connection_max_age_seconds: float = _opt(
        3600.0, "a connection older than this is asked to reconnect (GOAWAY); 0 = no limit"
    )
    connection_age_grace_seconds: float = _opt(
        60.0, "rpcs still running on a too-old connection are cut off after this grace"
    )
    registry_connections: int = _opt(
        8, "connections of the registry pool (SQLite or PostgreSQL), shared by all threads"
    )
    registry: str = _opt(
        "", "adapter metadata: empty = SQLite under --data-dir; postgresql://... = shared by a fleet"
    )
    blob_store: str = _opt(
        "", "adapter files: empty = a directory under --data-dir; s3://bucket/prefix = shared by a fleet"
    )
    s3_endpoint_url: str = _opt("", "S3-compatible endpoint (MinIO, Ceph); empty = AWS_ENDPOINT_URL or AWS")
    s3_region: str = _opt("", "S3 region; empty = AWS_REGION / AWS_DEFAULT_REGION")
    s3_multipart_bytes: int = _opt(
        64 << 20, "blobs this large or larger are uploaded to S3 in parts of this size"
    )
    job_lease_seconds: float = _opt(
        30.0, "shared registry: a replica that stops renewing a job's lease this long has the job failed"
    )
    replica_id: str = _opt("", "this replica's name in the shared registry; empty = host-pid-random")
    health_check_seconds: float = _opt(
        5.0, "how often the registry is probed; health NOT_SERVING when it fails"
    )
    tls_cert: str = _opt("", "PEM server certificate (enables TLS)")
    tls_key: str = _opt("", "PEM server private key")
    tls_client_ca: str = _opt("", "PEM CA that client certificates must chain to (enables mTLS)")
    expose_adapter_names: bool = _opt(
        False, "list running/waiting adapter names (tenant/name@N, top 16) in hotlora_lora_requests_info"
    )
    log_level: str = _opt("info", "debug | info | warning | error")
    log_format: str = _opt("text", "text | json", choices=("text", "json"))

    def __post_init__(self):
        problems = []
        for name in (
            "max_batch_size",
            "max_queue",
            "max_queue_per_tenant",
            "max_prefill_tokens",
            "max_prompt_tokens",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_texts",
            "adapter_slots",
            "max_rank",
            "workers",
            "max_jobs",
            "max_jobs_per_tenant",
            "max_finetune_examples",
            "max_finetune_example_tokens",
            "kv_block_size",
            "max_request_tokens",
            "upload_buffer_bytes",
            "max_tenant_bytes",
            "max_stream_requests",
            "registry_connections",
        ):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if not 0 <= self.port <= 65535:
            problems.append(f"--port must be 0..65535 (got {self.port})")
        if not -1 <= self.metrics_port <= 65535:
            problems.append(f"--metrics-port must be -1..65535 (got {self.metrics_port})")
        if not -1 <= self.http_port <= 65535:
            problems.append(f"--http-port must be -1..65535 (got {self.http_port})")
        for d in self.allowed_local_adapter_dir_list:
            if not Path(d).is_absolute() or not Path(d).is_dir():
                problems.append(f"--allowed-local-adapter-dirs: {d!r} is not an absolute path to a directory")
        if self.default_max_new_tokens > self.max_new_tokens:
            problems.append("--default-max-new-tokens cannot exceed --max-new-tokens")
        if not 0.0 <= self.train_idle_grace_ms <= 10_000:
            problems.append(f"--train-idle-grace-ms must be 0..10000 (got {self.train_idle_grace_ms})")
        if not 0.0 < self.train_share <= 1.0:
            problems.append(f"--train-share must be in (0, 1] (got {self.train_share})")
        if self.kv_block_size & (self.kv_block_size - 1):
            problems.append(f"--kv-block-size must be a power of two (got {self.kv_block_size})")
        if self.kv_cache_bytes < 1 << 20:
            problems.append(f"--kv-cache-bytes must be at least 1 MiB (got {self.kv_cache_bytes})")
        if self.runner not in ("auto", "transformers"):
            problems.append(f"--runner must be auto or transformers (got {self.runner!r})")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            problems.append(f"--dtype must be auto, float32, float16 or bfloat16 (got {self.dtype!r})")
        if self.weight_dtype not in ("auto", "float32", "bfloat16"):
            problems.append(f"--weight-dtype must be auto, float32 or bfloat16 (got {self.weight_dtype!r})")
        elif self.weight_dtype == "bfloat16" and self.dtype in ("float16", "bfloat16"):
            problems.append("--weight-dtype bfloat16 widens to fp32: it needs --dtype float32 (or auto)")
        elif self.weight_dtype == "bfloat16" and self.runner == "transformers":
            problems.append("--weight-dtype bfloat16 needs hotlora's runner, not --runner transformers")
        if self.adapter_dtype not in ("auto", "float32", "bfloat16"):
            problems.append(f"--adapter-dtype must be auto, float32 or bfloat16 (got {self.adapter_dtype!r})")
        elif self.adapter_dtype != "auto" and self.runner == "transformers":
            problems.append("--adapter-dtype needs hotlora's runner, not --runner transformers")
        elif self.adapter_dtype == "float32" and self.dtype in ("float16", "bfloat16"):
            problems.append(f"--adapter-dtype float32 needs fp32 compute, not --dtype {self.dtype}")
        elif self.adapter_dtype == "bfloat16" and self.dtype == "float16":
            problems.append("--adapter-dtype bfloat16 needs fp32 or bf16 compute, not --dtype float16")
        if self.torch_compile and self.runner == "transformers":
            problems.append("--torch-compile compiles hotlora's runner, not --runner transformers")
        elif self.torch_compile and self.dtype in ("float16", "bfloat16"):
            problems.append("--torch-compile needs --dtype float32 (or auto): hotlora's C kernels are fp32")
        elif self.torch_compile and self.device.startswith("cuda"):
            problems.append("--torch-compile is the CPU path: on CUDA, decode steps replay CUDA graphs")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            problems.append(f"--device must be auto, cpu or cuda[:N] (got {self.device!r})")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                problems.append(f"--{name.replace('_', '-')}: no such file {path!r}")
        if self.model and not Path(self.model).is_dir():
            problems.append(f"--model must be a local model directory; {self.model!r} is not one")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            problems.append(f"--log-level must be debug, info, warning or error (got {self.log_level!r})")
        for name in ("max_concurrent_rpcs", "max_rpcs_per_tenant", "max_pins_per_tenant"):
            if getattr(self, name) < 0:
                problems.append(
                    f"--{name.replace('_', '-')} must be 0 (automatic) or more (got {getattr(self, name)})"
                )
        for name in (
            "request_idle_seconds",
            "keepalive_seconds",
            "keepalive_timeout_seconds",
            "connection_idle_seconds",
            "connection_age_grace_seconds",
            "health_check_seconds",
            "max_train_unit_ms",
            "finetune_max_seconds",
        ):
            if not getattr(self, name) > 0:
                problems.append(f"--{name.replace('_', '-')} must be more than 0 (got {getattr(self, name)})")
        if self.connection_max_age_seconds < 0:
            problems.append("--connection-max-age-seconds must be 0 (no limit) or more")
        if self.max_request_tokens < self.max_prompt_tokens:
            problems.append("--max-request-tokens cannot be below --max-prompt-tokens")
        if self.upload_buffer_bytes < self.max_upload_bytes:
            problems.append("--upload-buffer-bytes cannot be below --max-upload-bytes (one upload must fit)")
        if not self.tokens_file:
            for flag, host in (
                ("--host", self.host),
                ("--metrics-host", self.metrics_host or self.host),
                ("--http-host", self.http_host or self.host),
            ):
                if host not in LOOPBACK:
                    problems.append(
                        "without --tokens-file the server runs in single-tenant dev mode and listens on "
                        f"127.0.0.1 only; give a tokens file to bind {host!r} ({flag})"
                    )
        problems += check_store_urls(self.registry, self.blob_store)
        if self.job_lease_seconds < 1.0:
            problems.append(f"--job-lease-seconds must be at least 1 (got {self.job_lease_seconds})")
        if self.s3_multipart_bytes < 5 << 20:
            problems.append(
                "--s3-multipart-bytes must be at least 5 MiB, S3's smallest part "
                f"(got {self.s3_multipart_bytes})"
            )
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

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


def add_config_arguments(parser) -> None:
    """One flag per field; the default comes from HOTLORA_<FIELD> when set."""
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = "HOTLORA_" + f.name.upper()
        default = f.default
        help_ = f"{f.metadata['help']} [env {env}; default {default!r}]"
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, default=None, action="store_true", help=help_)
            parser.add_argument(
                "--no-" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_false",
                help=argparse_suppress(),
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def config_from_args(args) -> ServerConfig:
    """Flag > environment variable > default; values converted to the field's type."""
    kwargs = {}
    for f in dataclasses.fields(ServerConfig):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = os.environ.get("HOTLORA_" + f.name.upper())
        if raw is None:
            continue
        kwargs[f.name] = _convert(f.name, f.type, raw)
    return ServerConfig(**kwargs)


def _convert(name: str, typ, raw):
    typ = typ if isinstance(typ, str) else typ.__name__
    if isinstance(raw, bool) or typ == "str":
        return raw
    try:
        if typ == "int":
            return int(str(raw).replace("_", ""))
        if typ == "float":
            return float(raw)
        if typ == "bool":
            v = str(raw).strip().lower()
            if v in ("1", "true", "yes", "on"):
                return True
            if v in ("0", "false", "no", "off"):
                return False
            raise ValueError(v)
    except ValueError:
        raise ValueError(
            f"invalid configuration: --{name.replace('_', '-')} expects {typ}, got {raw!r}"
        ) from None
    return raw
