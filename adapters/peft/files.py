"""The files of a PEFT adapter directory, and the limits one upload must keep.

An upload is checked here before any byte of it is decoded: only the config and the safetensors weights are
accepted, pickles are refused by name, and every size is bounded by `AdapterLimits`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hotlora.adapters.errors import InvalidArgument, ResourceExhausted
from hotlora.adapters.head_features import HEAD_FILE

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECORD_FILE = "hotlora_training.json"
"""A fine-tuned version's examples and validation (adapters/training/training_record.py): stored with the
version, never part of its PEFT directory; an upload that carries one has it dropped."""
# `save_pretrained` writes a model card (README.md); accepted and kept, never interpreted.
IGNORED_FILES = frozenset({"README.md", RECORD_FILE})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEY_PREFIX = "base_model.model."
MIB = 1 << 20


@dataclass(frozen=True)
class AdapterLimits:
    """What the server accepts in one adapter upload."""

    max_rank: int = 64
    """Largest LoRA rank of any module (r and every rank_pattern value)."""
    max_file_bytes: int = 512 * MIB
    """Largest single file."""
    max_upload_bytes: int = 1024 * MIB
    """All files of one upload together."""
    max_config_bytes: int = 64 * 1024
    """adapter_config.json."""
    max_header_bytes: int = 4 * MIB
    """The JSON header of adapter_model.safetensors."""
    max_labels: int = 4096
    """Classes of a SEQ_CLS head."""
    max_label_chars: int = 256

    def __post_init__(self) -> None:
        for name in (
            "max_rank",
            "max_file_bytes",
            "max_upload_bytes",
            "max_config_bytes",
            "max_header_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidArgument(f"AdapterLimits.{name} must be a positive integer, got {value!r}")
        if self.max_file_bytes > self.max_upload_bytes:
            raise InvalidArgument(
                f"AdapterLimits.max_file_bytes ({self.max_file_bytes}) must not exceed "
                f"max_upload_bytes ({self.max_upload_bytes})"
            )
        if self.max_labels < 1 or self.max_label_chars < 1:
            raise InvalidArgument("AdapterLimits.max_labels and max_label_chars must be at least 1")


MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    }
)
"""Files of a model's directory (transformers' save_pretrained), never of an adapter's."""


def model_files(names: Iterable[str]) -> list[str]:
    """Those of `names` that only a model's directory has (its config and weights, shards, a GGUF file):
    the one definition the server's checks and the client's upload share."""
    return sorted(
        n
        for n in names
        if n in MODEL_FILES
        or n.endswith(".gguf")
        or (n.startswith(("model-", "pytorch_model-")) and n.endswith((".safetensors", ".bin")))
    )


def refuse_model_files(names: Iterable[str]) -> None:
    """InvalidArgument naming a model's files, where `names` has any: an upload or a load of a model's
    directory is told it is a model, not an adapter (not a list of files that are not an adapter's)."""
    model = model_files(names)
    if model:
        raise InvalidArgument(
            f"these are a model's files ({', '.join(model[:4])}), not a PEFT adapter's: an adapter is "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}, as PeftModel.save_pretrained writes them. A server serves "
            "one base model (hotlora serve --model); upload the adapter of a fine-tune of it"
        )


def check_files(files: dict[str, bytes], limits: AdapterLimits) -> None:
    allowed = f"{CONFIG_FILE} and {WEIGHTS_FILE}"
    refuse_model_files(files)
    for name, data in files.items():
        if name.endswith(PICKLE_SUFFIXES):
            raise InvalidArgument(
                f"{name!r} is a pickle file, which can run code when loaded and is never accepted; "
                "save the adapter with safetensors (save_pretrained(..., safe_serialization=True)): "
                f"{allowed}"
            )
        if name not in (CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE) and name not in IGNORED_FILES:
            raise InvalidArgument(
                f"unexpected file {name!r} in the adapter; a PEFT adapter is {allowed} "
                f"(and {HEAD_FILE} for a head that reads other features than the last token's)"
            )
        if len(data) > limits.max_file_bytes:
            raise ResourceExhausted(
                f"{name} is {len(data)} bytes; the limit per file is {limits.max_file_bytes} bytes"
            )
    total = sum(len(d) for d in files.values())
    if total > limits.max_upload_bytes:
        raise ResourceExhausted(
            f"the adapter files total {total} bytes; the limit is {limits.max_upload_bytes} bytes"
        )
    missing = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in files]
    if missing:
        raise InvalidArgument(f"the adapter lacks {' and '.join(missing)}; a PEFT adapter is {allowed}")
