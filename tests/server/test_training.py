"""hotlora.v1.Training on a tiny random Llama: jobs learn, are gated, promoted and served at once, and
the exported adapter gives the server's outputs in PEFT."""

from __future__ import annotations

import random

import grpc
import pytest
import torch

from hotlora.kernels import bf16_weights
from hotlora.v1 import common_pb2, inference_pb2, training_pb2
from tests.server.harness import running_server
from tests.server.training_utils import (
    MARKER,
    long_lm_job,
    marker_examples,
    marker_text,
    one_intra_op_thread,
    seq_cls,
    wait_state,
    watch,
)
from tests.tiny import build_tiny_llama, tiny_llama_config, tiny_tokenizer

TEXTS = [marker_text(random.Random(99), i % 2 == 0) for i in range(6)]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with one_intra_op_thread(), running_server(tiny_model_dir, tmp_path_factory.mktemp("data")) as run:
        yield run


def _export(run, ref: str, out_dir):
    files: dict[str, bytes] = {}
    for c in run.adapters.ExportAdapter(common_pb2.AdapterRef(name=ref), timeout=30):
        files[c.filename] = files.get(c.filename, b"") + c.data
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out_dir / name).write_bytes(data)
    return out_dir


def _classify(run, ref, texts=TEXTS):
    resp = run.inference.Classify(inference_pb2.ClassifyRequest(adapter=ref, texts=texts), timeout=60)
    return [{s.label: s.score for s in r.scores} for r in resp.results]


def _peft_probs(adapter_dir, labels, texts=TEXTS, bf16_base: bool = False, bf16_lora: bool = False):
    """PEFT's class probabilities; `bf16_base`: the base's matrices as --weight-dtype bfloat16 stores them;
    `bf16_lora`: the adapter's A and B as bf16 banks hold them (the head stays fp32)."""
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    from tests.server.adapter_utils import round_lora_to_bf16

    base = LlamaForSequenceClassification(tiny_llama_config(num_labels=len(labels))).eval()
    state = build_tiny_llama().model.state_dict()
    if bf16_base:  # what --weight-dtype bfloat16 stores: matrices rounded to bf16, norms in fp32
        state = {k: v.to(torch.bfloat16).float() if v.ndim == 2 else v for k, v in state.items()}
    base.model.load_state_dict(state)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if bf16_lora:
        round_lora_to_bf16(model)
    tok = tiny_tokenizer()
    out = []
    with torch.no_grad():
        for t in texts:
            probs = torch.softmax(model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0], -1)
            out.append({label: float(probs[i]) for i, label in enumerate(labels)})
    return out


@pytest.mark.parametrize("method", [training_pb2.METHOD_HEAD_ONLY, training_pb2.METHOD_LORA])
def test_job_learns_a_separable_task_is_served_at_once_and_matches_peft(server, method, tmp_path):
    name = f"marker-{training_pb2.FineTuneMethod.Name(method).lower().replace('_', '-')}"
    job = server.training.CreateFineTune(
        seq_cls(name, marker_examples(120, seed=1), method=method), timeout=30
    )
    assert job.state == training_pb2.JOB_STATE_QUEUED and job.method == method and job.id
    events, job = watch(server.training, job.id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.promoted and job.result_adapter == f"{name}@1"
    assert job.metrics.metric_name == "accuracy"
    assert job.metrics.validation_metric >= 0.9 > job.metrics.baseline_metric
    steps = [e.job.metrics.step for e in events]
    assert steps == sorted(steps) and steps[-1] > 0
    assert any(e.job.state == training_pb2.JOB_STATE_RUNNING for e in events)

    served = _classify(server, name)
    pos = [t.endswith(MARKER) for t in TEXTS]
    assert [p["yes"] > 0.5 for p in served] == pos
    expected = _peft_probs(_export(server, name, tmp_path / name), ["no", "yes"])
    for s, e in zip(served, expected, strict=True):
        assert s == pytest.approx(e, abs=1e-4)


# (server options, base rounded to bf16, adapter rounded to bf16): bf16 banks come by default with bf16
# weights, or alone with --adapter-dtype bfloat16; --adapter-dtype float32 keeps them exact on bf16 weights
BF16_STORAGE = {
    "bf16 weights": (dict(weight_dtype="bfloat16"), True, True),
    "bf16 banks": (dict(adapter_dtype="bfloat16"), False, True),
    "bf16 weights, fp32 banks": (dict(weight_dtype="bfloat16", adapter_dtype="float32"), True, False),
}


@pytest.mark.skipif(bf16_weights.unavailable_reason() is not None, reason="no bf16-weight kernel here")
@pytest.mark.parametrize("storage", BF16_STORAGE)
def test_a_server_storing_bf16_trains_and_serves_as_peft_on_what_it_stores(storage, tiny_model_dir, tmp_path):
    # training runs through the runner with autograd (the widened-weight path) and fp32 LoRA weights;
    # serving reads the weights and the banks as stored
    options, bf16_base, bf16_lora = BF16_STORAGE[storage]
    with (
        one_intra_op_thread(),
        running_server(tiny_model_dir, tmp_path / "data", dtype="float32", **options) as run,
    ):
        req = seq_cls("marker-bf16", marker_examples(80, seed=1), method=training_pb2.METHOD_LORA)
        _, job = watch(run.training, run.training.CreateFineTune(req, timeout=30).id)
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.metrics.validation_metric >= 0.9 > job.metrics.baseline_metric
        served = _classify(run, "marker-bf16")
        out = _export(run, "marker-bf16", tmp_path / "out")
    expected = _peft_probs(out, ["no", "yes"], bf16_base=bf16_base, bf16_lora=bf16_lora)
    for s, e in zip(served, expected, strict=True):
        assert s == pytest.approx(e, abs=1e-4)


def test_continuing_an_adapter_makes_the_next_version_and_keeps_the_old_one(server):
    first = server.training.CreateFineTune(
        seq_cls("cont", marker_examples(80, seed=2), method=training_pb2.METHOD_HEAD_ONLY), timeout=30
    )
    _, first = watch(server.training, first.id)
    assert first.result_adapter == "cont@1"
    before = _classify(server, "cont@1")
    req = seq_cls(
        "cont",
        marker_examples(60, seed=3),
        method=training_pb2.METHOD_HEAD_ONLY,
        promote=training_pb2.PROMOTE_ALWAYS,
    )
    _, second = watch(server.training, server.training.CreateFineTune(req, timeout=30).id)
    assert second.state == training_pb2.JOB_STATE_SUCCEEDED and second.result_adapter == "cont@2"
    # it started from @1: the baseline is @1's accuracy on the new validation set, not the majority class
    assert second.metrics.baseline_metric >= 0.9
    assert _classify(server, "cont@1") == before
    assert server.adapters.GetAdapter(common_pb2.AdapterRef(name="cont")).version == 2


def test_causal_lm_lora_learns_a_completion_and_matches_peft_greedy(server, tmp_path):
    from tests.server.adapter_utils import peft_greedy

    rng = random.Random(5)
    prompts = [f"planet {''.join(rng.choice('abcdefgh') for _ in range(4))}?" for _ in range(40)]
    ex = [training_pb2.Example(prompt=p, completion=" zorb") for p in prompts[:32]]
    req = training_pb2.FineTuneRequest(
        adapter="zorb",
        task=common_pb2.TASK_CAUSAL_LM,
        method=training_pb2.METHOD_AUTO,
        examples=ex,
        hyperparameters=training_pb2.HyperParameters(learning_rate=1e-2, epochs=30, rank=8),
    )
    _, job = watch(server.training, server.training.CreateFineTune(req, timeout=30).id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.method in (training_pb2.METHOD_LORA, training_pb2.METHOD_LORA_PROGRESSIVE)  # AUTO: the better
    assert job.metrics.metric_name == "neg_completion_loss"
    assert job.metrics.validation_metric > job.metrics.baseline_metric
    out_dir = _export(server, "zorb", tmp_path / "zorb")
    tok = tiny_tokenizer()
    for p in prompts[32:36]:
        r = server.inference.Generate(
            inference_pb2.GenerateRequest(
                adapter="zorb", prompt=p, params=common_pb2.SamplingParams(max_new_tokens=8)
            ),
            timeout=60,
        )
        assert r.text == " zorb" and r.finish_reason == "eos"
        assert list(r.token_ids) == peft_greedy(out_dir, tok(p)["input_ids"], 8)[: len(r.token_ids)]


def test_unlearnable_labels_are_rejected_by_the_gate_with_both_scores(server):
    rng = random.Random(7)
    ex = [
        training_pb2.Example(
            text=marker_text(rng, rng.random() < 0.5), label="a" if rng.random() < 0.75 else "b"
        )
        for _ in range(100)
    ]
    _, job = watch(server.training, server.training.CreateFineTune(seq_cls("noise", ex), timeout=30).id)
    assert job.state == training_pb2.JOB_STATE_REJECTED, job.error
    assert not job.promoted and not job.result_adapter
    m = job.metrics
    assert m.metric_name == "accuracy" and 0.5 < m.baseline_metric < 1  # the majority class's share
    assert "not promoted" in job.error
    assert f"{m.validation_metric:.4f}" in job.error and f"{m.baseline_metric:.4f}" in job.error
    with pytest.raises(grpc.RpcError) as err:
        server.adapters.GetAdapter(common_pb2.AdapterRef(name="noise"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    files = server.state.training.artifact("default", job.id)  # kept for inspection, not served
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}
    exported = {}
    for c in server.adapters.ExportAdapter(common_pb2.AdapterRef(name=f"job:{job.id}")):
        exported[c.filename] = exported.get(c.filename, b"") + c.data
    assert exported == files  # over gRPC too, as `job:<id>`


def test_cancel_ends_the_job_without_an_adapter(server):
    job = server.training.CreateFineTune(long_lm_job("cancel-me"), timeout=30)
    wait_state(server.training, job.id, {training_pb2.JOB_STATE_RUNNING}, min_step=1)
    job = server.training.CancelFineTune(common_pb2.JobRef(id=job.id), timeout=10)
    assert job.state == training_pb2.JOB_STATE_CANCELLED
    _, job = watch(server.training, job.id)
    assert job.state == training_pb2.JOB_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as err:
        server.adapters.GetAdapter(common_pb2.AdapterRef(name="cancel-me"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = server.training.ListFineTunes(training_pb2.ListFineTunesRequest()).jobs
    assert any(j.id == job.id and j.state == training_pb2.JOB_STATE_CANCELLED for j in listed)


def test_inference_during_a_job_completes_with_unchanged_outputs(server):
    _, head = watch(
        server.training,
        server.training.CreateFineTune(
            seq_cls("during", marker_examples(40, seed=4), method=training_pb2.METHOD_HEAD_ONLY), timeout=30
        ).id,
    )
    prompts = ["hello world", "the quick brown fox", "abc"]

    def generate():
        return [
            list(
                server.inference.Generate(
                    inference_pb2.GenerateRequest(
                        prompt=p, params=common_pb2.SamplingParams(max_new_tokens=12)
                    ),
                    timeout=60,
                ).token_ids
            )
            for p in prompts
        ]

    idle_tokens, idle_probs = generate(), _classify(server, head.result_adapter)
    job = server.training.CreateFineTune(long_lm_job("busy"), timeout=30)
    wait_state(server.training, job.id, {training_pb2.JOB_STATE_RUNNING}, min_step=1)
    for _ in range(3):
        assert generate() == idle_tokens
        for a, b in zip(_classify(server, head.result_adapter), idle_probs, strict=True):
            assert a == pytest.approx(b, abs=1e-5)
    running = server.training.GetFineTune(common_pb2.JobRef(id=job.id))
    assert running.state == training_pb2.JOB_STATE_RUNNING and running.metrics.step > 1
    server.training.CancelFineTune(common_pb2.JobRef(id=job.id))


BAD = [
    ("no examples", dict(task=common_pb2.TASK_SEQ_CLS), "no training examples"),
    ("no task", dict(examples=[training_pb2.Example(text="a", label="x")] * 2), "task must be"),
    (
        "prompt for seq_cls",
        dict(task=common_pb2.TASK_SEQ_CLS, examples=[training_pb2.Example(prompt="a", completion="b")] * 2),
        "SEQ_CLS example",
    ),
    (
        "missing completion",
        dict(task=common_pb2.TASK_CAUSAL_LM, examples=[training_pb2.Example(prompt="a")] * 2),
        "non-empty prompt and completion",
    ),
    (
        "one label",
        dict(task=common_pb2.TASK_SEQ_CLS, examples=[training_pb2.Example(text="a", label="x")] * 3),
        "at least 2",
    ),
    (
        "label not listed",
        dict(
            task=common_pb2.TASK_SEQ_CLS,
            labels=["x", "y"],
            examples=[training_pb2.Example(text="a", label="x"), training_pb2.Example(text="b", label="z")],
        ),
        "not in labels",
    ),
    (
        "head only lm",
        dict(
            task=common_pb2.TASK_CAUSAL_LM,
            method=training_pb2.METHOD_HEAD_ONLY,
            examples=[training_pb2.Example(prompt="a", completion="b")] * 2,
        ),
        "HEAD_ONLY",
    ),
    (
        "rank",
        dict(task=common_pb2.TASK_SEQ_CLS, hyperparameters=training_pb2.HyperParameters(rank=1000)),
        "rank",
    ),
    (
        "lr",
        dict(task=common_pb2.TASK_SEQ_CLS, hyperparameters=training_pb2.HyperParameters(learning_rate=5)),
        "learning_rate",
    ),
    (
        "target",
        dict(
            task=common_pb2.TASK_SEQ_CLS,
            hyperparameters=training_pb2.HyperParameters(target_modules=["lm_head"]),
        ),
        "target_modules",
    ),
    (
        "layer",
        dict(
            task=common_pb2.TASK_SEQ_CLS,
            hyperparameters=training_pb2.HyperParameters(layers_to_transform=[7]),
        ),
        "layers_to_transform",
    ),
]


@pytest.mark.parametrize("case,fields,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_invalid_argument_with_a_message(server, case, fields, message):
    fields = dict(fields)
    if "examples" not in fields and case not in ("no examples",):
        fields["examples"] = marker_examples(4, seed=0)
    with pytest.raises(grpc.RpcError) as err:
        server.training.CreateFineTune(training_pb2.FineTuneRequest(adapter="bad", **fields), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_unknown_adapter_version_or_job_is_not_found(server):
    with pytest.raises(grpc.RpcError) as err:
        server.training.CreateFineTune(seq_cls("never@3", marker_examples(10, seed=0)), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for call in (server.training.GetFineTune, server.training.CancelFineTune):
        with pytest.raises(grpc.RpcError) as err:
            call(common_pb2.JobRef(id="0123456789abcdef"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
