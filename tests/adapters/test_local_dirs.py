"""Server-side adapter directories (vLLM's load_lora_adapter) read only inside the allowed directories:
links out are refused before anything opens them, links that stay inside are followed, and a file or a
directory swapped for a link between the check and the read is refused, not read."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from hotlora.adapters.errors import InvalidArgument, NotFound, PermissionDenied
from hotlora.adapters.local_dirs import LocalAdapterDirs

CONFIG = b'{"peft_type": "LORA", "r": 8}'
WEIGHTS = b"\x00" * 64

_opened: list[str] | None = None  # paths opened while a test records them (an audit hook cannot be removed)
_hook_lock = threading.Lock()


def _audit(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@pytest.fixture
def tree(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for d in (allowed / "bot", outside):
        d.mkdir(parents=True)
    (allowed / "bot" / "adapter_config.json").write_bytes(CONFIG)
    (allowed / "bot" / "adapter_model.safetensors").write_bytes(WEIGHTS)
    (outside / "secret").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    return allowed, outside


def test_a_plain_directory_is_read(tree):
    allowed, _ = tree
    dirs = LocalAdapterDirs([str(allowed)], 1 << 20)
    files = dirs.read(dirs.listing(str(allowed / "bot")))
    assert files == {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}


def test_a_link_to_a_file_outside_is_refused_and_never_opened(tree):
    global _opened
    allowed, outside = tree
    (allowed / "bot" / "adapter_config.json").unlink()
    (allowed / "bot" / "adapter_config.json").symlink_to(outside / "secret")
    dirs = LocalAdapterDirs([str(allowed)], 1 << 20)
    with _hook_lock:
        _opened = []
        try:
            with pytest.raises(PermissionDenied) as exc:
                dirs.read(dirs.listing(str(allowed / "bot")))
            opened, _opened = _opened, None
        finally:
            _opened = None
    assert "adapter_config.json" in exc.value.message and "was not opened" in exc.value.message
    assert str(outside / "secret") not in opened


def test_links_that_stay_inside_are_followed(tree):
    allowed, _ = tree
    # a Hugging Face cache's layout: snapshot files link to blobs beside them
    blobs = allowed / "blobs"
    blobs.mkdir()
    (blobs / "cfg").write_bytes(CONFIG)
    (allowed / "bot" / "adapter_config.json").unlink()
    (allowed / "bot" / "adapter_config.json").symlink_to(blobs / "cfg")
    dirs = LocalAdapterDirs([str(allowed)], 1 << 20)
    assert dirs.read(dirs.listing(str(allowed / "bot")))["adapter_config.json"] == CONFIG


def test_a_file_swapped_for_a_link_after_the_check_is_not_read(tree):
    allowed, outside = tree
    dirs = LocalAdapterDirs([str(allowed)], 1 << 20)
    listing = dirs.listing(str(allowed / "bot"))
    target = allowed / "bot" / "adapter_config.json"
    target.unlink()
    target.symlink_to(outside / "secret")
    with pytest.raises(PermissionDenied, match="changed while it was being loaded"):
        dirs.read(listing)


def test_a_directory_swapped_for_a_link_after_the_check_is_not_read(tree):
    allowed, outside = tree
    dirs = LocalAdapterDirs([str(allowed)], 1 << 20)
    listing = dirs.listing(str(allowed / "bot"))
    # the same file names outside; the directory on the way becomes a link to them
    for f in listing:
        (outside / f.name).write_bytes((allowed / "bot" / f.name).read_bytes())
    (allowed / "bot").rename(allowed / "was-bot")
    (allowed / "bot").symlink_to(outside)
    with pytest.raises(PermissionDenied, match="changed while it was being loaded"):
        dirs.read(listing)


def test_paths_outside_nul_bytes_and_special_files(tree, tmp_path):
    allowed, outside = tree
    dirs = LocalAdapterDirs([str(allowed)], 1 << 20)
    for path in (str(outside), str(allowed / ".." / "outside"), "/etc"):
        with pytest.raises(PermissionDenied):
            dirs.listing(path)
    (allowed / "escape").symlink_to(outside)
    with pytest.raises(PermissionDenied):
        dirs.listing(str(allowed / "escape"))
    with pytest.raises(InvalidArgument, match="NUL"):
        dirs.listing(str(allowed / "bot") + "\x00/etc/passwd")
    with pytest.raises(NotFound):
        dirs.listing(str(allowed / "nothing-here"))
    os.mkfifo(allowed / "bot" / "pipe")  # opening a FIFO would block: it is skipped, never opened
    assert {f.name for f in dirs.listing(str(allowed / "bot"))} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    with pytest.raises(PermissionDenied, match="--allowed-local-adapter-dirs"):
        LocalAdapterDirs([], 1 << 20).listing(str(allowed / "bot"))


def test_a_models_directory_is_named_a_model_before_its_size_or_file_count(tree):
    allowed, _ = tree
    model = allowed / "SmolLM2"
    model.mkdir()
    for name in (
        "config.json",
        "model-00001-of-00002.safetensors",
        "tokenizer.json",
        *(f"x{i}" for i in range(9)),
    ):
        (model / name).write_bytes(b"{}" * 1024)
    dirs = LocalAdapterDirs([str(allowed)], 1024)  # over the size and the file count too
    with pytest.raises(InvalidArgument, match="a model's files .*not a PEFT adapter's"):
        dirs.listing(str(model))
