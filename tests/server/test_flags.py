"""The flag table: every field of `hotlora serve`'s and `serve-fleet`'s configs is one flag and one
HOTLORA_<FLAG> variable, parsed to its type, and a bad value fails naming the flag. Parametrised over the
fields themselves, so a flag added later is covered by these tests without touching them."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from hotlora.server.config import ServerConfig, add_config_arguments, config_from_args
from hotlora.server.flags import (
    ConfigError,
    _allowed,
    _choices,
    add_flags,
    env_name,
    flag_fields,
    flag_name,
)
from hotlora.server.fleet.app import FleetConfig, fleet_config_from

SERVER_FLAGS = [f.name for f in flag_fields(ServerConfig)]
FLEET_FLAGS = [f.name for f in flag_fields(FleetConfig)]
SHARED_STORES = {"registry": "postgresql://db/x", "blob_store": "s3://bucket/prefix"}


@pytest.fixture
def paths(tmp_path) -> dict[str, str]:
    (tmp_path / "file.pem").write_text("x")
    (tmp_path / "dir").mkdir()
    return {"file": str(tmp_path / "file.pem"), "dir": str(tmp_path / "dir")}


def _info(cls, name):
    return cls.__pydantic_fields__[name]


def other_value(cls, name: str, paths: dict[str, str]) -> tuple[str, Any, dict[str, str]]:
    """A valid value for flag `name` other than its default: (text as typed, the parsed value, the
    other flags it needs)."""
    special = {
        "model": (paths["dir"], paths["dir"], {}),
        "allowed_local_adapter_dirs": (paths["dir"], paths["dir"], {}),
        "tokens_file": (paths["file"], paths["file"], {}),
        "tls_cert": (paths["file"], paths["file"], {"tls_key": paths["file"]}),
        "tls_key": (paths["file"], paths["file"], {"tls_cert": paths["file"]}),
        "tls_client_ca": (
            paths["file"],
            paths["file"],
            {"tls_cert": paths["file"], "tls_key": paths["file"]},
        ),
        "registry": ("postgresql://db/x", "postgresql://db/x", {"blob_store": "s3://b/p"}),
        "blob_store": ("s3://b/p", "s3://b/p", {"registry": "postgresql://db/x"}),
        "device": ("cpu", "cpu", {}),
        "host": ("localhost", "localhost", {}),
        "metrics_host": ("::1", "::1", {}),
        "http_host": ("localhost", "localhost", {}),
        "ray_http_host": ("0.0.0.0", "0.0.0.0", {}),
    }
    if name in special:
        return special[name]
    info = _info(cls, name)
    default = info.default
    choices = _choices(info)
    if choices:
        value = next(c for c in choices if c != default)
        return value, value, {}
    if info.annotation is bool:
        return str(not default).lower(), not default, {}
    if info.annotation is str:
        return "some-value", "some-value", {}
    typ = info.annotation
    for candidate in (default * 2, default + 1, default - 1):
        if candidate != default and _within(info, candidate):
            return str(typ(candidate)), typ(candidate), {}
    raise AssertionError(f"no other value for {name}")


def _within(info, x) -> bool:
    for m in info.metadata:
        if hasattr(m, "ge") and x < m.ge or hasattr(m, "gt") and x <= m.gt:
            return False
        if hasattr(m, "le") and x > m.le or hasattr(m, "lt") and x >= m.lt:
            return False
    return True


def bad_value(cls, name: str) -> str | None:
    """Text the flag must refuse (None: any text is a valid value)."""
    info = _info(cls, name)
    if _choices(info):
        return "no-such-choice"
    if info.annotation is bool:
        return "maybe"
    if info.annotation in (int, float):
        for m in info.metadata:
            if hasattr(m, "ge"):
                return str(info.annotation(m.ge) - 1)
            if hasattr(m, "gt"):
                return str(info.annotation(m.gt))
        return "abc"
    if "must" in (info.json_schema_extra or {}):  # a pattern or length with its words
        return ""
    return None


def parse_server(argv: list[str], environ: dict[str, str]) -> ServerConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return config_from_args(p.parse_args(argv), environ)


def parse_fleet(argv: list[str], environ: dict[str, str]) -> FleetConfig:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    add_flags(p, FleetConfig)
    return fleet_config_from(p.parse_args(argv), environ)


def _argv(name, text, info) -> list[str]:
    if info.annotation is bool:
        return [flag_name(name)] if text == "true" else ["--no-" + name.replace("_", "-")]
    return [flag_name(name), text]


def test_every_field_is_a_flag():
    """Nothing about a flag is declared outside its field: each has help, and the 76+ of serve are all
    flags (a field without help would be silently missing from the command line)."""
    assert len(SERVER_FLAGS) == len(dataclasses.fields(ServerConfig)) >= 76
    assert FLEET_FLAGS == [
        "replicas", "replica_cpus", "max_adapters_per_replica", "grpc_port", "ray_http_port", "ray_http_host",
    ]  # fmt: skip
    for contract in ("model", "host", "port", "metrics_port", "data_dir", "tokens_file"):
        assert contract in SERVER_FLAGS


@pytest.mark.parametrize("name", SERVER_FLAGS)
def test_each_serve_flag_parses_from_the_command_line_and_the_environment(name, paths):
    text, value, needs = other_value(ServerConfig, name, paths)
    info = _info(ServerConfig, name)
    assert value != info.default
    extra = [a for k, v in needs.items() for a in (flag_name(k), v)]
    from_cli = parse_server([*_argv(name, text, info), *extra], {})
    from_env = parse_server(extra, {env_name(name): text})
    assert getattr(from_cli, name) == value and type(getattr(from_cli, name)) is type(value)
    assert getattr(from_env, name) == value
    # the flag wins over the variable; no flag and no variable is the default
    if info.annotation is not bool:
        assert (
            getattr(parse_server([*_argv(name, text, info), *extra], {env_name(name): "zz"}), name) == value
        )
    assert getattr(parse_server([], {}), name) == info.default


@pytest.mark.parametrize("name", FLEET_FLAGS)
def test_each_serve_fleet_flag_parses_from_the_command_line_and_the_environment(name, paths):
    text, value, _ = other_value(FleetConfig, name, paths)
    base = ["--tokens-file", paths["file"], "--registry", SHARED_STORES["registry"]]
    base += ["--blob-store", SHARED_STORES["blob_store"]]
    info = _info(FleetConfig, name)
    assert getattr(parse_fleet([*base, *_argv(name, text, info)], {}), name) == value
    assert getattr(parse_fleet(base, {env_name(name): text}), name) == value
    fleet = parse_fleet([*base, "--max-batch-size", "3"], {"HOTLORA_PORT": "0"})
    assert (fleet.server.max_batch_size, fleet.server.port) == (3, 0)  # serve's flags, shared


BAD = [(n, bad_value(ServerConfig, n)) for n in SERVER_FLAGS if bad_value(ServerConfig, n) is not None]


@pytest.mark.parametrize(("name", "text"), BAD, ids=[n for n, _ in BAD])
def test_a_bad_value_fails_naming_the_flag(name, text):
    info = _info(ServerConfig, name)
    if info.annotation is not bool:  # a boolean flag takes no text on the command line
        with pytest.raises(ConfigError) as err:
            parse_server([flag_name(name), text], {})
        (problem,) = err.value.problems
        assert problem.startswith(flag_name(name)), problem
        assert _allowed(info) in problem or "expects" in problem, problem
    # the same value from the environment: the message also names the variable
    with pytest.raises(ConfigError) as err:
        parse_server([], {env_name(name): text})
    (problem,) = err.value.problems
    assert problem.startswith(flag_name(name)) and problem.endswith(f"[set by {env_name(name)}]"), problem


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "65536"], "--port must be 0..65535 (got 65536)"),
        (["--metrics-port", "-2"], "--metrics-port must be -1..65535 (got -2)"),
        (["--dtype", "fp8"], "--dtype must be auto, float32, float16 or bfloat16 (got 'fp8')"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda[:N] (got 'tpu')"),
        (["--log-level", "verbose"], "--log-level must be debug, info, warning or error (got 'verbose')"),
        (["--kv-block-size", "12"], "--kv-block-size must be a power of two (got 12)"),
        (["--kv-cache-bytes", "1000"], "--kv-cache-bytes must be at least 1 MiB (got 1000)"),
        (["--train-share", "1.5"], "--train-share must be in (0, 1] (got 1.5)"),
        (["--max-batch-size", "2.5"], "--max-batch-size expects int, got '2.5'"),
        (
            ["--reflection", "--no-reflection", "--grace-seconds", "x"],
            "--grace-seconds expects float, got 'x'",
        ),
        (["--tokens-file", "/no/such/file"], "--tokens-file: no such file '/no/such/file'"),
        (["--allowed-local-adapter-dirs", "relative/dir"], "'relative/dir' is not an absolute path"),
        (["--registry", "mysql://x"], "--registry must be empty (SQLite) or postgresql://..."),
        (["--http-port", "9400"], "--metrics-port and --http-port must differ (both 9400"),
        (["--port", "8000"], "--port and --http-port must differ"),
    ],
)
def test_messages_say_what_is_allowed(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_server(argv, {})
    assert message in str(err.value)


def test_the_log_level_is_read_in_any_case():
    assert parse_server(["--log-level", "WARNING"], {}).log_level == "warning"


def test_a_bad_boolean_in_the_environment_is_refused():
    with pytest.raises(
        ConfigError, match=r"--reflection expects bool, got 'maybe' \[set by HOTLORA_REFLECTION\]"
    ):
        parse_server([], {"HOTLORA_REFLECTION": "maybe"})
    assert parse_server([], {"HOTLORA_REFLECTION": "0"}).reflection is False


def test_a_bad_fleet_flag_fails_naming_it(paths):
    base = ["--tokens-file", paths["file"], "--registry", SHARED_STORES["registry"]]
    base += ["--blob-store", SHARED_STORES["blob_store"]]
    with pytest.raises(ConfigError, match=r"--replicas must be at least 1 \(got 0\)"):
        parse_fleet([*base, "--replicas", "0"], {})
    with pytest.raises(
        ConfigError, match=r"--grpc-port must be 1..65535 \(got 0\) \[set by HOTLORA_GRPC_PORT\]"
    ):
        parse_fleet(base, {"HOTLORA_GRPC_PORT": "0"})
    with pytest.raises(
        ConfigError, match=r"--ray-http-host must be an address \(127.0.0.1, 0.0.0.0, ...\) \(got ''\)"
    ):
        parse_fleet([*base, "--ray-http-host", ""], {})
    with pytest.raises(ConfigError, match="--grpc-port and --ray-http-port must differ"):
        parse_fleet([*base, "--grpc-port", "8000"], {})
    with pytest.raises(ConfigError, match=r"--max-batch-size must be at least 1"):  # serve's, for replicas
        parse_fleet([*base, "--max-batch-size", "0"], {})


def test_code_that_builds_a_config_hears_the_flag_names_too():
    with pytest.raises(ConfigError, match=r"--max-rank must be at least 1 \(got 0\)"):
        ServerConfig(max_rank=0)
    cfg = ServerConfig(port=0)
    with pytest.raises(ConfigError, match=r"--port must be 0..65535 \(got -5\)"):
        dataclasses.replace(cfg, port=-5)
    with pytest.raises(ConfigError, match="unknown setting 'max_rnak'"):
        ServerConfig(max_rnak=4)


def test_help_shows_each_flag_with_its_variable_default_and_bounds():
    p = argparse.ArgumentParser(prog="hotlora serve")
    add_config_arguments(p)
    text = " ".join(p.format_help().split())
    for name in SERVER_FLAGS:
        assert flag_name(name) in text and env_name(name) in text, name
    assert "[0..65535; env HOTLORA_PORT; default 50051]" in text
    assert "--dtype {auto,float32,float16,bfloat16}" in text
