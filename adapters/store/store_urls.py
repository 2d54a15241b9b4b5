"""Which store URLs the registry takes (docs/design.md §7): checked by the server's config before anything is
opened, and by `shared_stores.StoreConfig`. Imports nothing heavy: the CLI reads it to parse flags."""

from __future__ import annotations

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_store_urls(registry: str, blob_store: str) -> list[str]:
    problems = []
    if registry and not registry.startswith(POSTGRES_SCHEMES):
        problems.append(f"--registry must be empty (SQLite) or postgresql://... (got {registry!r})")
    if blob_store and not blob_store.startswith("s3://"):
        problems.append(
            f"--blob-store must be empty (a local directory) or s3://bucket/prefix (got {blob_store!r})"
        )
    if bool(registry) != bool(blob_store):
        problems.append(
            "--registry postgresql://... and --blob-store s3://... go together: replicas sharing one must "
            "share the other (a local SQLite file or blob directory is seen by one process only)"
        )
    return problems
