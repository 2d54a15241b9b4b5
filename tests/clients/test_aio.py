"""AsyncClient against the same fake servicers."""

import asyncio

import grpc
import pytest

from hotlora.clients import AsyncClient, ClientError
from hotlora.v1 import common_pb2, training_pb2
from tests.clients.conftest import CONFIG_BYTES, MODEL_BYTES
from tests.clients.fakes import FakeInference

WAIT = 120  # a bound that only a hung call reaches; the tests wait on the server's events


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, WAIT))


def test_async_generate_and_token(fake):
    async def go():
        async with AsyncClient(fake.address, token="tok") as c:
            resp = await c.generate("hi", adapter="a", seed=3)
            health = await c.health()
            return resp, health

    resp, health = run(go())
    assert resp.text == "echo: hi" and health == "SERVING"
    assert fake.rec.last_metadata()["authorization"] == "Bearer tok"
    assert fake.rec.requests("Generate")[0].params.seed == 3


def test_async_stream_and_cancel(fake):
    async def go():
        async with AsyncClient(fake.address) as c:
            full = [ch.text async for ch in c.generate_stream("hi")]
            stream = c.generate_stream("forever")
            first = [await stream.__anext__() for _ in range(3)]
            await stream.aclose()
            # the "forever" call's own end: the "hi" stream before it has ended too
            call = fake.inference.streams["forever"]
            ended = await asyncio.to_thread(call.ended.wait, WAIT)
            return full, first, ended, call

    full, first, ended, call = run(go())
    assert "".join(full) == "".join(FakeInference.STREAM_TEXT)
    assert [ch.text for ch in first] == ["t0 ", "t1 ", "t2 "]
    assert ended and call.context.is_active() is False


def test_async_upload_export_and_errors(fake, peft_dir, tmp_path):
    fake.adapters.export_chunks = [
        common_pb2.FileChunk(filename="adapter_config.json", data=CONFIG_BYTES),
        common_pb2.FileChunk(filename="adapter_model.safetensors", data=MODEL_BYTES[:1000]),
        common_pb2.FileChunk(filename="adapter_model.safetensors", data=MODEL_BYTES[1000:]),
    ]

    async def go():
        async with AsyncClient(fake.address) as c:
            adapter = await c.upload_adapter(peft_dir, "bot", labels=["x"], chunk_size=1024)
            paths = await c.export_adapter("bot", tmp_path / "out")
            with pytest.raises(grpc.RpcError) as err:
                await c.get_adapter("missing")
            (peft_dir / "extra.txt").write_text("x")
            with pytest.raises(ClientError):
                await c.upload_adapter(peft_dir, "bot")
            return adapter, paths, err.value.code()

    adapter, paths, code = run(go())
    assert adapter.name == "bot" and adapter.size_bytes == len(CONFIG_BYTES) + len(MODEL_BYTES)
    assert len(fake.adapters.uploads) == 1
    assert {p.name: p.read_bytes() for p in paths} == {
        "adapter_config.json": CONFIG_BYTES,
        "adapter_model.safetensors": MODEL_BYTES,
    }
    assert code == grpc.StatusCode.NOT_FOUND


def test_async_finetune(fake):
    async def go():
        async with AsyncClient(fake.address) as c:
            job = await c.create_finetune("s", "SEQ_CLS", [{"text": "a", "label": "b"}], method="HEAD_ONLY")
            events = [e async for e in c.watch_finetune(job.id)]
            listed = await c.list_finetunes()
            return events, listed

    events, listed = run(go())
    assert events[-1].job.state == training_pb2.JOB_STATE_SUCCEEDED
    assert fake.rec.requests("CreateFineTune")[0].method == training_pb2.METHOD_HEAD_ONLY
    assert listed.jobs[0].id == "job-1"
