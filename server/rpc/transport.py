"""gRPC channel arguments of the server: message sizes, keepalive, and idle/age limits on connections.

A connection that stops answering keepalive pings is closed; one with no rpc for
--connection-idle-seconds is closed; one older than --connection-max-age-seconds is asked to reconnect
(GOAWAY), and rpcs still running on it are cut off after --connection-age-grace-seconds. So no peer holds
a connection, and the calls on it, forever."""

from __future__ import annotations

from hotlora.server.config import ServerConfig

# clients may ping at most this often without data before grpc counts a strike (2 strikes: GOAWAY)
MIN_CLIENT_PING_INTERVAL_MS = 10_000


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    opts = [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", _ms(cfg.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(cfg.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection: that is the point
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", _ms(cfg.connection_idle_seconds)),
    ]
    if cfg.connection_max_age_seconds > 0:
        opts += [
            ("grpc.max_connection_age_ms", _ms(cfg.connection_max_age_seconds)),
            ("grpc.max_connection_age_grace_ms", _ms(cfg.connection_age_grace_seconds)),
        ]
    return opts
