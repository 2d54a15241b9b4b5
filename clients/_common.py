"""Pieces shared by the sync and asyncio clients: channel options, request builders, enum names, files.

Nothing here opens a connection; everything is plain data in, protobuf messages (or files) out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2, training_pb2

DEFAULT_ADDRESS = "127.0.0.1:50051"
#: Upper bound on one gRPC message each way; uploads are chunked far below this.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
#: The files of a PEFT adapter directory that are uploaded, in this order.
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: What an exported head that reads other features than the last token's final state carries.
HEAD_FILE = "head_config.json"
#: Files PEFT's `save_pretrained` writes next to the adapter that are not part of it: skipped on upload.
IGNORED_FILES = frozenset({"README.md", ".gitattributes"})
#: Files only a model's directory has (transformers' `save_pretrained`): an upload of one is refused as such.
#: The server decides the same (hotlora.adapters.peft.files.model_files; the client imports no server code).
MODEL_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "generation_config.json",
    }
)

ProgressCallback = Callable[[int, int], None]


class ClientError(ValueError):
    """A request refused on the client side, before anything was sent (bad argument, bad file)."""


# ---------------------------------------------------------------------------------------------- channels


def channel_options(options: Iterable[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """Default channel options (explicit max message lengths) overridden by `options`."""
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    }
    for key, value in options or ():
        merged[key] = value
    return list(merged.items())


def read_pem(value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read certificate/key file {os.fspath(value)!r}: {exc.strerror}") from exc


def tls_material(
    root_certificates: bytes | str | os.PathLike[str] | None,
    private_key: bytes | str | os.PathLike[str] | None,
    certificate_chain: bytes | str | os.PathLike[str] | None,
    tls: bool | None,
) -> tuple[bool, bytes | None, bytes | None, bytes | None]:
    """(use_tls, root, key, chain). TLS is on when asked for or when any certificate is given."""
    root, key, chain = read_pem(root_certificates), read_pem(private_key), read_pem(certificate_chain)
    if (key is None) != (chain is None):
        raise ClientError("mTLS needs both a client certificate and its private key")
    use_tls = bool(tls) if tls is not None else any(v is not None for v in (root, key, chain))
    if not use_tls and any(v is not None for v in (root, key, chain)):
        raise ClientError("certificates were given but tls=False")
    return use_tls, root, key, chain


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


# ---------------------------------------------------------------------------------------------- enums


def to_enum(enum: Any, prefix: str, value: str | int | None, what: str) -> int:
    """Map a friendly name ("seq_cls", "SEQ-CLS", "TASK_SEQ_CLS") or a number onto a proto enum value."""
    if value is None:
        return 0
    if isinstance(value, int):
        if value not in enum.values():
            raise ClientError(f"unknown {what} {value}")
        return value
    key = str(value).strip().upper().replace("-", "_")
    for candidate in (key, prefix + key):
        if candidate in enum.keys():
            return enum.Value(candidate)
    allowed = ", ".join(k.removeprefix(prefix) for k in enum.keys() if not k.endswith("UNSPECIFIED"))
    raise ClientError(f"unknown {what} {value!r}; allowed: {allowed}")


def enum_name(enum: Any, prefix: str, value: int) -> str:
    """The friendly name of an enum value ("SEQ_CLS"), or the number when unknown."""
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return str(value)


TASK = (common_pb2.Task, "TASK_")
METHOD = (training_pb2.FineTuneMethod, "METHOD_")
PROMOTE = (training_pb2.Promote, "PROMOTE_")
JOB_STATE = (training_pb2.JobState, "JOB_STATE_")
ADAPTER_STATE = (adapters_pb2.AdapterState, "ADAPTER_STATE_")
ADAPTER_SOURCE = (adapters_pb2.AdapterSource, "ADAPTER_SOURCE_")
TERMINAL_JOB_STATES = frozenset(
    training_pb2.JobState.Value(f"JOB_STATE_{s}") for s in ("SUCCEEDED", "FAILED", "CANCELLED", "REJECTED")
)


# ---------------------------------------------------------------------------------------------- inference


def _chat_message(m: Any) -> common_pb2.ChatMessage:
    if isinstance(m, common_pb2.ChatMessage):
        return m
    if isinstance(m, Mapping):
        unknown = set(m) - {"role", "content"}
        if unknown or "content" not in m:
            raise ClientError(f"a chat message is {{role, content}}, got keys {sorted(m)}")
        return common_pb2.ChatMessage(role=str(m.get("role", "user")), content=str(m["content"]))
    if isinstance(m, Sequence) and not isinstance(m, str) and len(m) == 2:
        return common_pb2.ChatMessage(role=str(m[0]), content=str(m[1]))
    raise ClientError(f"a chat message is a dict {{role, content}} or a (role, content) pair, got {m!r}")


def generate_request(
    prompt: str | None,
    *,
    messages: Iterable[Any] | None,
    adapter: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Iterable[str] | str,
    request_id: str,
) -> inference_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise ClientError("give either a prompt or chat messages (exactly one)")
    if isinstance(stop, str):
        stop = (stop,)
    params = common_pb2.SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=list(stop)
    )
    if seed is not None:
        params.seed = seed
    req = inference_pb2.GenerateRequest(adapter=adapter or "", params=params, request_id=request_id or "")
    if prompt is not None:
        req.prompt = prompt
    else:
        req.messages.extend(_chat_message(m) for m in messages or ())
        if not req.messages:
            raise ClientError("messages is empty")
    return req


def texts_list(texts: Iterable[str] | str) -> list[str]:
    return [texts] if isinstance(texts, str) else [str(t) for t in texts]


# ---------------------------------------------------------------------------------------------- adapters


def peft_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files to upload from a PEFT adapter directory (an export's head_config.json too), refusing
    anything that is not part of one; a model's directory is named as such."""
    root = Path(directory)
    if not root.is_dir():
        raise ClientError(f"{os.fspath(directory)!r} is not a directory (expected a PEFT adapter directory)")
    present = {p.name for p in root.iterdir()}
    model_files = sorted(n for n in present if _is_model_file(n))
    if model_files:
        what = "is a model directory" if PEFT_FILES[0] not in present else "holds a whole model's files"
        raise ClientError(
            f"{os.fspath(directory)!r} {what} ({', '.join(model_files[:4])}), not a PEFT adapter: an adapter "
            f"directory holds {' and '.join(PEFT_FILES)}, as PeftModel.save_pretrained writes them. To serve "
            "this model, start a server on it (hotlora serve --model DIR); to serve a fine-tune of it, save "
            "the PeftModel's adapter with save_pretrained and upload that directory"
        )
    if "adapter_model.bin" in present:
        raise ClientError(
            "adapter_model.bin (pickle) is not accepted; only safetensors is. "
            "Re-save the adapter with save_pretrained(..., safe_serialization=True)"
        )
    extra = sorted(present - set(PEFT_FILES) - {HEAD_FILE} - IGNORED_FILES)
    if extra:
        raise ClientError(
            f"{os.fspath(directory)!r} holds files that are not part of a PEFT adapter: {', '.join(extra)}; "
            f"only {' and '.join(PEFT_FILES)} (and an export's {HEAD_FILE}) are uploaded"
        )
    missing = [name for name in PEFT_FILES if name not in present]
    if missing:
        raise ClientError(f"{os.fspath(directory)!r} lacks {', '.join(missing)}")
    files = [root / name for name in (*PEFT_FILES, HEAD_FILE) if name in present]
    for f in files:
        if not f.is_file():
            raise ClientError(f"{os.fspath(f)!r} is not a regular file")
    return files


def _is_model_file(name: str) -> bool:
    """A file of a model's directory (transformers' config and weights, a GGUF file), never an adapter's."""
    return (
        name in MODEL_FILES
        or name.endswith(".gguf")
        or (name.startswith(("model-", "pytorch_model-")) and name.endswith((".safetensors", ".bin")))
    )


def upload_chunks(
    files: Sequence[Path],
    name: str,
    *,
    description: str,
    labels: Iterable[str],
    chunk_size: int,
    progress: ProgressCallback | None,
) -> Iterator[adapters_pb2.UploadChunk]:
    """First a message with name/description/labels, then each file in `chunk_size` pieces."""
    if chunk_size <= 0 or chunk_size > MAX_MESSAGE_BYTES // 2:
        raise ClientError(f"chunk_size must be in 1..{MAX_MESSAGE_BYTES // 2}")
    total = sum(f.stat().st_size for f in files)
    sent = 0
    yield adapters_pb2.UploadChunk(name=name, description=description, labels=list(labels))
    if progress:
        progress(0, total)
    for path in files:
        with path.open("rb") as fh:
            first = True
            while True:
                data = fh.read(chunk_size)
                if not data and not first:
                    break
                first = False
                yield adapters_pb2.UploadChunk(filename=path.name, data=data)
                sent += len(data)
                if progress:
                    progress(sent, total)
                if len(data) < chunk_size:
                    break


def safe_filename(name: str) -> str:
    """A server-given filename, accepted only as a plain base name inside the destination."""
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name != os.path.basename(name)
        or (len(name) > 1 and name[1] == ":")
    ):
        raise ClientError(f"the server sent an unsafe filename {name!r}; refusing to write it")
    return name


class ExportWriter:
    """Writes streamed FileChunks into `dest_dir`: each file to `<name>.part`, renamed when the stream ends.

    On error every partial file is removed, so a failed export leaves no half-written adapter.
    """

    def __init__(self, dest_dir: str | os.PathLike[str]):
        self.dest = Path(dest_dir)
        self.dest.mkdir(parents=True, exist_ok=True)
        self._handles: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}

    def write(self, chunk: common_pb2.FileChunk) -> None:
        name = safe_filename(chunk.filename)
        fh = self._handles.get(name)
        if fh is None:
            fh = self._handles[name] = (self.dest / (name + ".part")).open("wb")
            self.sizes[name] = 0
        fh.write(chunk.data)
        self.sizes[name] += len(chunk.data)

    def commit(self) -> list[Path]:
        out = []
        for name, fh in self._handles.items():
            fh.close()
            final = self.dest / name
            os.replace(self.dest / (name + ".part"), final)
            out.append(final)
        self._handles.clear()
        return out

    def abort(self) -> None:
        for name, fh in self._handles.items():
            fh.close()
            (self.dest / (name + ".part")).unlink(missing_ok=True)
        self._handles.clear()


# ---------------------------------------------------------------------------------------------- training

_EXAMPLE_KEYS = frozenset({"text", "label", "prompt", "completion"})
_HP_FIELDS = {
    "rank": int,
    "alpha": float,
    "learning_rate": float,
    "epochs": int,
    "batch_size": int,
    "target_modules": list,
    "layers_to_transform": list,
    "seed": int,
}
_HP_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lr": "learning_rate", "layers": "layers_to_transform"}


def example(e: Any, where: str) -> training_pb2.Example:
    if isinstance(e, training_pb2.Example):
        return e
    if not isinstance(e, Mapping):
        raise ClientError(
            f"{where}: an example is a dict {{text, label}} or {{prompt, completion}}, got {e!r}"
        )
    unknown = set(e) - _EXAMPLE_KEYS
    if unknown:
        raise ClientError(
            f"{where}: unknown example keys {sorted(unknown)}; use {{text, label}} or {{prompt, completion}}"
        )
    fields = {k: ("" if v is None else str(v)) for k, v in e.items()}
    if not (("text" in fields and "label" in fields) or ("prompt" in fields and "completion" in fields)):
        raise ClientError(f"{where}: an example needs text and label, or prompt and completion")
    return training_pb2.Example(**fields)


def hyperparameters(
    hp: Mapping[str, Any] | training_pb2.HyperParameters | None,
) -> training_pb2.HyperParameters:
    if hp is None:
        return training_pb2.HyperParameters()
    if isinstance(hp, training_pb2.HyperParameters):
        return hp
    msg = training_pb2.HyperParameters()
    for key, value in hp.items():
        field = _HP_ALIASES.get(key, key)
        if field not in _HP_FIELDS:
            allowed = ", ".join(_HP_FIELDS)
            raise ClientError(f"unknown hyper-parameter {key!r}; allowed: {allowed}")
        if value is None:
            continue
        if _HP_FIELDS[field] is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            items = [int(v) for v in value] if field == "layers_to_transform" else [str(v) for v in value]
            getattr(msg, field).extend(items)
        else:
            setattr(msg, field, _HP_FIELDS[field](value))
    return msg


def finetune_request(
    adapter: str,
    task: str | int,
    examples: Iterable[Any],
    *,
    validation: Iterable[Any],
    method: str | int,
    labels: Iterable[str],
    hyperparameters_: Mapping[str, Any] | training_pb2.HyperParameters | None,
    promote: str | int,
    use_chat_template: bool,
    description: str,
    max_seconds: float = 0.0,
) -> training_pb2.FineTuneRequest:
    req = training_pb2.FineTuneRequest(
        max_seconds=max_seconds,
        adapter=adapter,
        task=to_enum(*TASK, task, "task"),
        method=to_enum(*METHOD, method, "method"),
        promote=to_enum(*PROMOTE, promote, "promote mode"),
        labels=[str(label) for label in labels],
        use_chat_template=use_chat_template,
        description=description,
        hyperparameters=hyperparameters(hyperparameters_),
    )
    req.examples.extend(example(e, f"example {i}") for i, e in enumerate(examples))
    req.validation.extend(example(e, f"validation example {i}") for i, e in enumerate(validation))
    if not req.examples:
        raise ClientError("no training examples given")
    return req


def evaluate_request(
    adapter: str, examples: Iterable[Any], *, job_id: str, task: str | int | None, use_chat_template: bool
) -> training_pb2.EvaluateRequest:
    req = training_pb2.EvaluateRequest(
        adapter=adapter, job_id=job_id, task=to_enum(*TASK, task, "task"), use_chat_template=use_chat_template
    )
    req.examples.extend(example(e, f"example {i}") for i, e in enumerate(examples))
    if not req.examples:
        raise ClientError("no examples to evaluate")
    return req
