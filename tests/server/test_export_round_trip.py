"""Exports that reproduce the server (issue 34): every head kind AUTO can promote is trained by a job,
exported, and loaded the way its export says — stock PEFT (`AutoModelForSequenceClassification` +
`PeftModel.from_pretrained`) for a head on the last token's final state, hotlora.clients.exported_heads
for one on other features (the export's head_config.json and README.md and GetAdapter's `export_loader`
say so) — and gives the server's class probabilities to 1e-4 in fp32. An export uploads back as it is."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hotlora.adapters.head_features import EXPORT_LOADER, HeadFeatures, auto_choices
from hotlora.clients import Client
from hotlora.clients.exported_heads import load_classifier
from hotlora.v1 import common_pb2, inference_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.training_utils import marker_examples, marker_text, seq_cls, watch
from tests.tiny import tiny_tokenizer

LABELS = ["no", "yes"]
_rng = random.Random(5)
TEXTS = [marker_text(_rng, i % 2 == 0) for i in range(5)] + ["a", "zz zz b"]  # one token to a dozen
HEAD_KINDS = {f"head-{f.pooling}-{'last' if f.layer == -1 else f.layer}": f for f in auto_choices(2)}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("data")) as run:  # fp32 (the harness)
        yield run


def _train(server, name: str, req: training_pb2.FineTuneRequest) -> training_pb2.FineTuneJob:
    _, job = watch(server.training, server.training.CreateFineTune(req, timeout=30).id, timeout=600)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED and job.result_adapter == f"{name}@1", job.error
    return job


@pytest.fixture(scope="module")
def trained(server):
    """One promoted adapter per head kind AUTO can promote: its four heads, and LoRA with a head."""
    mp = pytest.MonkeyPatch()
    try:
        for name, features in HEAD_KINDS.items():
            # AUTO, its head choices narrowed to one: that head is the first candidate, the budget ends
            # the search after it, and promote=ALWAYS serves it whatever it scored
            mp.setattr("hotlora.adapters.training.finetune_tasks.auto_choices", lambda n, f=features: (f,))
            req = seq_cls(name, marker_examples(24, seed=3), promote=training_pb2.PROMOTE_ALWAYS)
            req.max_seconds, req.hyperparameters.epochs = 0.001, 40
            job = _train(server, name, req)
            assert job.metrics.winner == f"HEAD_ONLY({features.describe()})"
    finally:
        mp.undo()
    lora = seq_cls("lora", marker_examples(16, seed=4), method=training_pb2.METHOD_LORA)
    lora.validation.extend(marker_examples(8, seed=5))  # held out as given: one run, not five folds
    lora.hyperparameters.epochs, lora.promote = 2, training_pb2.PROMOTE_ALWAYS
    _train(server, "lora", lora)
    return server


def _served(server, name: str) -> torch.Tensor:
    resp = server.inference.Classify(inference_pb2.ClassifyRequest(adapter=name, texts=TEXTS), timeout=60)
    return torch.tensor(
        [[{s.label: s.score for s in r.scores}[label] for label in LABELS] for r in resp.results]
    )


def _export(server, name: str, out: Path) -> Path:
    with Client(server.address) as client:
        client.export_adapter(name, out)
    return out


def _stock_peft(tiny_model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    """As users load a PEFT SEQ_CLS adapter: the base as a sequence classifier, then PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=len(LABELS), dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tok = tiny_tokenizer()
    with torch.no_grad():
        return torch.stack(
            [torch.softmax(model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0], -1) for t in TEXTS]
        )


@pytest.mark.parametrize("name", [*HEAD_KINDS, "lora"])
def test_an_export_loaded_as_it_says_gives_the_servers_probabilities(trained, tiny_model_dir, tmp_path, name):
    served = _served(trained, name)
    out = _export(trained, name, tmp_path / name)
    got = trained.adapters.GetAdapter(common_pb2.AdapterRef(name=name))
    features = HEAD_KINDS.get(name, HeadFeatures())
    assert (got.head_features.pooling, got.head_features.layer) == (features.pooling, features.layer)
    # the documented loader reproduces every kind, from the base model's directory as users have it
    clf = load_classifier(out, str(tiny_model_dir))
    assert clf.features == features
    torch.testing.assert_close(clf.probabilities(TEXTS), served, atol=1e-4, rtol=0)
    stock = _stock_peft(tiny_model_dir, out)
    if features.peft_computes:  # stock PEFT alone, and the export says nothing more is needed
        assert got.export_loader == ""
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        torch.testing.assert_close(stock, served, atol=1e-4, rtol=0)
    else:  # the export says PEFT alone does not reproduce it, and how to load it
        assert got.export_loader == EXPORT_LOADER
        files = sorted(p.name for p in out.iterdir())
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "head_config.json"]
        readme = (out / "README.md").read_text()
        assert "Stock PEFT does not reproduce this adapter" in readme and f"from {EXPORT_LOADER}" in readme
        assert (
            f"hidden_states[{features.layer}]" in readme
            and "Labels, in the order of the head's rows: no, yes" in readme
        )
        assert (stock - served).abs().max() > 1e-3  # what users got before: another classifier


def test_the_loader_batches_texts_of_different_lengths_as_one_by_one(trained, tiny_model_dir, tmp_path):
    out = _export(trained, "head-mean-1", tmp_path / "e")
    clf = load_classifier(out, str(tiny_model_dir))
    one_by_one = torch.cat([clf.probabilities([t]) for t in TEXTS])
    torch.testing.assert_close(clf.probabilities(TEXTS), one_by_one, atol=1e-5, rtol=0)


def test_an_export_uploads_back_and_serves_the_same(trained, tmp_path):
    out = _export(trained, "head-mean-1", tmp_path / "e")  # with its README.md and head_config.json
    with Client(trained.address) as client:
        client.upload_adapter(out, "again", labels=LABELS)
    torch.testing.assert_close(_served(trained, "again"), _served(trained, "head-mean-1"), atol=1e-6, rtol=0)
    got = trained.adapters.GetAdapter(common_pb2.AdapterRef(name="again"))
    assert (got.head_features.pooling, got.head_features.layer) == ("mean", 1)


def test_a_rejected_jobs_artifact_export_says_the_same(trained, monkeypatch):
    monkeypatch.setattr(
        "hotlora.adapters.training.finetune_tasks.auto_choices", lambda n: (HeadFeatures("mean", 1),)
    )
    rng = random.Random(3)
    shuffled = [
        training_pb2.Example(text=marker_text(rng, i % 2 == 0), label=rng.choice(LABELS)) for i in range(24)
    ]
    req = seq_cls("noise", shuffled)
    req.max_seconds, req.hyperparameters.epochs = 0.001, 40
    _, job = watch(trained.training, trained.training.CreateFineTune(req, timeout=30).id, timeout=600)
    assert job.state == training_pb2.JOB_STATE_REJECTED, job.error
    files = {}
    for chunk in trained.adapters.ExportAdapter(common_pb2.AdapterRef(name=f"job:{job.id}"), timeout=30):
        files[chunk.filename] = files.get(chunk.filename, b"") + chunk.data
    assert {"README.md", "head_config.json"} <= set(files)
    assert b"layer `1`" in files["README.md"] and b"rows: no, yes" in files["README.md"]
