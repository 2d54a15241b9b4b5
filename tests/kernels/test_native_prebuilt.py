"""The C kernels' module built ahead of time ($HOTLORA_KERNELS_DIR, as the container image ships it): used
with no compiler when built from these very sources, ignored when not."""

from __future__ import annotations

import shutil

import pytest

from hotlora.kernels import native

pytestmark = pytest.mark.skipif(
    native.unavailable_reason() is not None, reason=f"{native.unavailable_reason()}"
)


@pytest.fixture
def prebuilt_dir(tmp_path, monkeypatch):
    """The module as `python -m hotlora.kernels DIR` leaves it (copied from this user's cache, where the
    kernel tests build it anyway)."""
    folder = tmp_path / "kernels"
    folder.mkdir()
    shutil.copy2(native.build(native.cache_dir()), folder)
    monkeypatch.setenv(native.PREBUILT_ENV, str(folder))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setattr(native, "cxx_compiler", lambda: None)
    return folder


def test_a_machine_without_a_compiler_runs_the_kernels_built_ahead(prebuilt_dir):
    assert native.unavailable_reason() is None
    assert native.prebuilt() == prebuilt_dir / native.module_name()
    native.ops.cache_clear()
    try:
        assert native.ops().rms_norm  # loaded, nothing built
    finally:
        native.ops.cache_clear()
    assert not (prebuilt_dir.parent / "cache").exists()


def test_a_module_built_from_other_sources_is_not_used(prebuilt_dir):
    stale = prebuilt_dir / native.module_name()
    stale.rename(prebuilt_dir / f"{native.MODULE}-0123456789abcdef.so")  # as if a source had changed since
    assert native.prebuilt() is None
    assert native.unavailable_reason() == (
        "no C and C++ compiler (cc/gcc and c++/g++, or $CC and $CXX) to build the kernels"
        f" and ${native.PREBUILT_ENV} holds no build of these sources"
    )


def test_the_module_name_follows_the_sources_and_the_headers(tmp_path, monkeypatch):
    before = native.module_name()
    copy = tmp_path / "csrc"
    shutil.copytree(native.CSRC, copy)
    monkeypatch.setattr(native, "CSRC", copy)
    assert native.module_name() == before
    for name in ("kernels.h", "lora_decode.c", "bind_lora.cpp"):  # a header, a kernel, a binding
        changed = copy / name
        kept = changed.read_text()
        changed.write_text(kept + "\n")
        assert native.module_name() != before, name
        changed.write_text(kept)
    assert native.module_name() == before


def test_python_m_hotlora_kernels_builds_the_module_into_a_folder(tmp_path, capsys):
    # the objects come from a copy of this user's cache (built there by the kernel tests): only the link runs
    shutil.copytree(native.cache_dir() / "obj", tmp_path / "obj")
    assert native.main([str(tmp_path)]) == 0
    assert (tmp_path / native.module_name()).is_file()
    assert str(tmp_path / native.module_name()) in capsys.readouterr().out
