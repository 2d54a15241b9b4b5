"""Heads on other features than the last token's final state (issue 16: AUTO compares last token vs mean
pooling, last layer vs an upper-middle one): a head carries its choice in head_config.json and Classify
computes exactly those features, on both runners, in batches that mix heads of different choices; a head
stored without the file reads what every head read before."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from hotlora.v1 import adapters_pb2, common_pb2, inference_pb2
from tests.server.adapter_utils import make_seq_cls_adapter
from tests.server.harness import running_server
from tests.server.test_training import _peft_probs
from tests.tiny import build_tiny_llama, tiny_tokenizer

LABELS = ["neg", "neu", "pos"]
TEXTS = ["good movie", "bad", "it was fine I guess, not more", "a"]
CHOICES = {"last-final": None, "mean-final": ("mean", -1), "last-mid": ("last", 1), "mean-mid": ("mean", 1)}


@pytest.fixture(scope="module", params=["auto", "transformers"])
def server(request, tiny_model_dir, tmp_path_factory):
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("data"), runner=request.param) as run:
        yield run


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    return make_seq_cls_adapter(tmp_path_factory.mktemp("peft") / "c")


def _chunks(name: str, files: dict[str, bytes]):
    yield adapters_pb2.UploadChunk(name=name, labels=LABELS)
    for fname, data in files.items():
        yield adapters_pb2.UploadChunk(filename=fname, data=data)


def _files(directory: Path, features) -> dict[str, bytes]:
    files = {n: (directory / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    if features is not None:
        files["head_config.json"] = json.dumps({"pooling": features[0], "layer": features[1]}).encode()
    return files


@pytest.fixture(scope="module")
def uploaded(server, adapter_dir):
    for name, features in CHOICES.items():
        server.adapters.UploadAdapter(_chunks(name, _files(adapter_dir, features)), timeout=30)
    return server


def _reference(adapter_dir: Path, pooling: str, layer: int) -> list[list[float]]:
    """transformers + PEFT: the adapter's LoRA on the base, `output_hidden_states[layer]` pooled, the head."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(build_tiny_llama(), str(adapter_dir)).eval()
    head = next(
        v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items() if "score" in k
    )
    tok, out = tiny_tokenizer(), []
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            h = model.base_model.model.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]
            pooled = h.mean(0) if pooling == "mean" else h[-1]
            out.append(torch.softmax(pooled.float() @ head.float().t(), -1).tolist())
    return out


def _probs(resp) -> list[list[float]]:
    return [[{s.label: s.score for s in r.scores}[label] for label in LABELS] for r in resp.results]


def _classify(run, name):
    return run.inference.Classify(inference_pb2.ClassifyRequest(adapter=name, texts=TEXTS), timeout=60)


@pytest.mark.parametrize("name", ["mean-final", "last-mid", "mean-mid"])
def test_a_head_is_served_on_the_features_it_was_trained_on(uploaded, adapter_dir, name):
    pooling, layer = CHOICES[name]
    got = _probs(_classify(uploaded, name))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(_reference(adapter_dir, pooling, layer)))
    a = uploaded.adapters.GetAdapter(common_pb2.AdapterRef(name=name))
    assert (a.head_features.pooling, a.head_features.layer) == (pooling, layer)
    exported = {c.filename: c.data for c in uploaded.adapters.ExportAdapter(common_pb2.AdapterRef(name=name))}
    assert json.loads(exported["head_config.json"]) == {"pooling": pooling, "layer": layer}


def test_heads_of_different_features_share_batches_and_each_gets_its_own(uploaded, adapter_dir):
    want = {
        n: (_reference(adapter_dir, *f) if f else _peft_probs(adapter_dir, LABELS, TEXTS))
        for n, f in CHOICES.items()
    }
    names = list(CHOICES) * 3
    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(_classify, uploaded, n) for n in names]
        results = [f.result() for f in futures]
    for name, resp in zip(names, results, strict=True):
        got = torch.tensor(_probs(resp))
        ref = want[name]
        ref = torch.tensor([[r[label] for label in LABELS] for r in ref] if isinstance(ref[0], dict) else ref)
        torch.testing.assert_close(got, ref)
    # the four choices give four different answers: a row that read another head's features would show
    firsts = {tuple(round(p, 4) for p in _probs(r)[2]) for r in results[:4]}
    assert len(firsts) == 4


def test_a_head_stored_without_head_config_reads_the_last_token_as_before(uploaded, adapter_dir):
    got = _probs(_classify(uploaded, "last-final"))
    peft = _peft_probs(adapter_dir, LABELS, TEXTS)  # PEFT's own sequence classifier
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor([[r[label] for label in LABELS] for r in peft])
    )
    a = uploaded.adapters.GetAdapter(common_pb2.AdapterRef(name="last-final"))
    assert (a.head_features.pooling, a.head_features.layer) == ("last", -1)
    exported = {c.filename for c in uploaded.adapters.ExportAdapter(common_pb2.AdapterRef(name="last-final"))}
    assert exported == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize(
    ("config", "code", "words"),
    [
        (b'{"pooling": "max", "layer": -1}', grpc.StatusCode.INVALID_ARGUMENT, "last, mean"),
        (b'{"pooling": "mean", "layer": 7}', grpc.StatusCode.FAILED_PRECONDITION, "layers 1..2"),
        (b'{"pooling": "mean", "extra": 1}', grpc.StatusCode.INVALID_ARGUMENT, '"pooling" and "layer" only'),
        (b"[1]", grpc.StatusCode.INVALID_ARGUMENT, "JSON object"),
    ],
)
def test_a_bad_head_config_is_refused_with_what_is_allowed(uploaded, adapter_dir, config, code, words):
    files = {**_files(adapter_dir, None), "head_config.json": config}
    with pytest.raises(grpc.RpcError) as e:
        uploaded.adapters.UploadAdapter(_chunks("bad-head", files), timeout=30)
    assert e.value.code() == code and words in e.value.details()
