"""The registry as a user sees it: versions, references, tenants, export, crash safety, concurrency."""

from __future__ import annotations

import hashlib
import threading

import pytest

from hotlora.adapters.errors import InvalidArgument, NotFound
from hotlora.adapters.names import parse_ref, validate_name
from hotlora.adapters.peft.format import AdapterLimits, parse_peft_adapter
from hotlora.adapters.store.s3_blob_store import S3BlobStore, S3Options
from hotlora.adapters.store.shared_stores import StoreConfig, open_registry

LIMITS = AdapterLimits()


@pytest.fixture(params=["sqlite+local", "postgresql+s3"])
def stores(request, tmp_path) -> StoreConfig:
    """The one-process default, or the stores a fleet shares (real PostgreSQL and S3 servers)."""
    if request.param == "sqlite+local":
        return StoreConfig(tmp_path / "data")
    shared = request.getfixturevalue("shared_stores")
    return StoreConfig(
        tmp_path / "data",
        registry=shared.registry,
        blob_store=shared.blob_store,
        s3=S3Options(endpoint_url=shared.endpoint),
        replica_id="test",
    )


@pytest.fixture
def registry(stores):
    reg = open_registry(stores)
    yield reg
    reg.close()


def _damage(registry, sha: str, data: bytes) -> None:
    if isinstance(registry.blobs, S3BlobStore):
        registry.blobs.client.put_object(
            Bucket=registry.blobs.location.bucket, Key=registry.blobs._key(sha), Body=data
        )
    else:
        (registry.blobs.root / sha[:2] / sha[2:]).write_bytes(data)


def _leave_partial_write(registry) -> None:
    """What a crash inside put() leaves: a temp file, or an S3 multipart upload never completed."""
    if isinstance(registry.blobs, S3BlobStore):
        registry.blobs.client.create_multipart_upload(
            Bucket=registry.blobs.location.bucket, Key=registry.blobs._key("ab" * 32)
        )
    else:
        (registry.blobs.root / "ab").mkdir(exist_ok=True)
        (registry.blobs.root / "ab" / ".tmp-partial").write_bytes(b"half")


@pytest.fixture
def upload(causal_files, base_info):
    """(files, weights) of a valid adapter; `upload.variant(i)` gives different bytes."""
    weights = parse_peft_adapter(causal_files, base_info, LIMITS)
    return causal_files, weights


def _variant(files, i: int) -> dict[str, bytes]:
    # A different README keeps the tensors valid but changes the stored bytes.
    return dict(files, **{"README.md": f"variant {i}".encode()})


def test_new_upload_of_a_name_is_version_n_plus_1(registry, upload):
    files, weights = upload
    first = registry.commit("t1", "bot", files, weights, description="first")
    second = registry.commit("t1", "bot", _variant(files, 2), weights)
    assert (first.version, second.version) == (1, 2)
    assert first.ref == "bot@1" and second.ref == "bot@2"
    assert registry.resolve("t1", "bot").version == 2
    assert registry.resolve("t1", "bot@1").description == "first"
    assert first.sha256 == hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()
    assert first.size_bytes == sum(len(d) for d in files.values())
    assert (first.task, first.rank, first.alpha, first.target_modules) == (
        "CAUSAL_LM",
        4,
        8.0,
        ("q_proj", "v_proj"),
    )
    assert first.source == "UPLOAD" and first.created_at.tzinfo is not None


def test_unknown_refs_say_what_exists(registry, upload):
    files, weights = upload
    registry.commit("t1", "bot", files, weights)
    with pytest.raises(NotFound, match="'bot' has no version 7; it has 1 version.*bot@1"):
        registry.resolve("t1", "bot@7")
    with pytest.raises(NotFound, match="adapter 'nope' not found"):
        registry.resolve("t1", "nope")
    with pytest.raises(InvalidArgument, match="invalid adapter name"):
        registry.resolve("t1", "../etc/passwd")


def test_delete_one_version_or_all_and_versions_are_never_reused(registry, upload):
    files, weights = upload
    for i in range(3):
        registry.commit("t1", "bot", _variant(files, i), weights)
    removed = registry.delete("t1", "bot@3")
    assert [r.ref for r in removed] == ["bot@3"]
    assert registry.resolve("t1", "bot").version == 2
    assert registry.commit("t1", "bot", files, weights).version == 4
    removed = registry.delete("t1", "bot")
    assert [r.version for r in removed] == [1, 2, 4]
    with pytest.raises(NotFound):
        registry.resolve("t1", "bot")
    with pytest.raises(NotFound):
        registry.delete("t1", "bot")
    assert registry.commit("t1", "bot", files, weights).version == 5
    assert list(registry.blobs.list()) == sorted(set(registry.resolve("t1", "bot").files.values()))


def test_deleting_keeps_blobs_other_versions_share(registry, upload):
    files, weights = upload
    a = registry.commit("t1", "a", files, weights)
    registry.commit("t1", "b", files, weights)  # same bytes, same blobs
    registry.delete("t1", "a")
    assert registry.read_files(registry.resolve("t1", "b")) == files
    assert all(registry.blobs.exists(sha) for sha in a.files.values())


def test_tenants_are_isolated(registry, upload):
    files, weights = upload
    registry.commit("alice", "bot", files, weights)
    registry.commit("alice", "bot", files, weights)
    with pytest.raises(NotFound):
        registry.resolve("bob", "bot")
    with pytest.raises(NotFound):
        registry.delete("bob", "bot")
    assert registry.list("bob") == []
    assert registry.commit("bob", "bot", files, weights).version == 1
    registry.delete("bob", "bot")
    assert registry.resolve("alice", "bot").version == 2


def test_list_latest_or_all_versions_with_prefix(registry, upload):
    files, weights = upload
    for name in ["sup_a", "sup_a", "supxb", "other"]:
        registry.commit("t1", name, files, weights)
    assert [r.ref for r in registry.list("t1")] == ["other@1", "sup_a@2", "supxb@1"]
    assert [r.ref for r in registry.list("t1", prefix="sup_")] == ["sup_a@2"]  # '_' is no wildcard
    assert [r.ref for r in registry.list("t1", all_versions=True)] == [
        "other@1",
        "sup_a@1",
        "sup_a@2",
        "supxb@1",
    ]


def test_export_is_byte_identical_and_reloads(registry, upload, base_info):
    files, weights = upload
    record = registry.commit("t1", "bot", files, weights)
    assert registry.read_files(record) == files
    again = registry.load_weights(record, base_info, LIMITS)
    assert set(again.modules) == set(weights.modules)


def test_seq_cls_labels_are_kept(registry, base_info, peft_adapter):
    from peft import LoraConfig

    files, _ = peft_adapter(LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=2, target_modules=["q_proj"]))
    weights = parse_peft_adapter(files, base_info, LIMITS, labels=["no", "maybe", "yes"])
    record = registry.commit("t1", "cls", files, weights, source="FINETUNE")
    assert (
        record.labels == ("no", "maybe", "yes") and record.task == "SEQ_CLS" and record.source == "FINETUNE"
    )
    assert registry.load_weights(record, base_info, LIMITS).labels == ("no", "maybe", "yes")


def test_damaged_blob_is_detected_on_read(registry, upload):
    files, weights = upload
    record = registry.commit("t1", "bot", files, weights)
    _damage(registry, record.sha256, b"garbage")
    with pytest.raises(RuntimeError, match="damaged"):
        registry.read_files(record)


def test_crash_between_blobs_and_metadata_leaves_nothing_visible(stores, upload, monkeypatch):
    files, weights = upload
    registry = open_registry(stores)
    registry.commit("t1", "kept", files, weights)

    def crash(draft, quota=None, caller=None):
        raise SystemExit("simulated crash before the metadata transaction")

    monkeypatch.setattr(registry.metadata, "insert_next_version", crash)
    other = {**_variant(files, 9), "adapter_config.json": files["adapter_config.json"] + b" "}
    with pytest.raises(SystemExit):
        registry.commit("t1", "lost", other, weights)
    _leave_partial_write(registry)  # of yet another blob
    orphans = set(registry.blobs.list()) - set(registry.resolve("t1", "kept").files.values())
    assert orphans  # the blobs of the failed commit are on disk
    registry.close()

    reopened = open_registry(stores)
    with pytest.raises(NotFound):
        reopened.resolve("t1", "lost")
    assert [r.ref for r in reopened.list("t1")] == ["kept@1"]
    assert set(reopened.blobs.list()) == set(reopened.resolve("t1", "kept").files.values())
    if not isinstance(reopened.blobs, S3BlobStore):
        assert not (reopened.blobs.root / "ab" / ".tmp-partial").exists()
    assert reopened.commit("t1", "lost", other, weights).version == 1
    reopened.close()


def test_reopen_serves_every_committed_version(stores, upload):
    files, weights = upload
    registry = open_registry(stores)
    made = [
        registry.commit(t, n, _variant(files, i), weights)
        for i, (t, n) in enumerate([("a", "x"), ("a", "x"), ("b", "y")])
    ]
    registry.close()
    reopened = open_registry(stores)
    for record in made:
        assert reopened.resolve(record.tenant, record.ref) == record
        assert reopened.read_files(record) == _variant(files, made.index(record))
    reopened.close()


def test_concurrent_commits_get_distinct_versions(registry, upload):
    files, weights = upload
    results, errors = [], []

    def work(i: int) -> None:
        try:
            for j in range(3):
                results.append(registry.commit("t1", "bot", _variant(files, i * 10 + j), weights).version)
                registry.resolve("t1", "bot")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == list(range(1, 19))
    assert [r.version for r in registry.list("t1", all_versions=True)] == list(range(1, 19))


def test_commit_checks_its_arguments(registry, upload):
    files, weights = upload
    with pytest.raises(InvalidArgument, match="invalid adapter name"):
        registry.commit("t1", "Bad Name", files, weights)
    with pytest.raises(InvalidArgument, match="source"):
        registry.commit("t1", "bot", files, weights, source="MAGIC")
    with pytest.raises(InvalidArgument, match="description"):
        registry.commit("t1", "bot", files, weights, description="x" * 5000)
    with pytest.raises(InvalidArgument, match="tenant"):
        registry.commit("", "bot", files, weights)
    assert registry.list("t1") == []


@pytest.mark.parametrize("name", ["a", "bot-1.2_x", "0" * 64])
def test_valid_names(name):
    assert validate_name(name) == name
    assert parse_ref(f"{name}@12") == (name, 12)


@pytest.mark.parametrize(
    "ref", ["", "A", "-a", ".a", "a..b", "a/b", "a" * 65, "a@0", "a@", "a@x", "a@1@2", "a@-1"]
)
def test_invalid_refs(ref):
    with pytest.raises(InvalidArgument):
        parse_ref(ref)


def test_a_blob_deleted_while_an_identical_upload_looks_at_it_is_written_again(tmp_path, monkeypatch):
    # an upload and a delete of the same content race in the content-addressed store: the upload found the
    # file, the delete removed it before the upload's next look; the upload must write it, not fail
    from pathlib import Path

    from hotlora.adapters.store.blob_store import LocalBlobStore

    store = LocalBlobStore(tmp_path / "blobs")
    digest = store.put(b"weights")
    store.delete(digest)
    monkeypatch.setattr(Path, "is_file", lambda self: True)  # the first look of the old two-look check
    assert store.put(b"weights") == digest
    monkeypatch.undo()
    assert store.get(digest) == b"weights"
