"""One precision, decided once (server/precision.py): a table of flags x machine x checkpoint -> what the
server computes and stores in, and the combinations refused with the flags named."""

from __future__ import annotations

import pytest
import torch

from hotlora.server.precision import Checkpoint, Machine, Precision, resolve_precision

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# machines: AVX-512 CPU without / with avx512_bf16 (or AMX), a CPU without hotlora's kernels, a GPU
XEON = Machine(CPU, kernels=True, fast_bf16=False)
EPYC = Machine(CPU, kernels=True, fast_bf16=True)
BARE = Machine(CPU, kernels=False, fast_bf16=False)
BARE_BF16 = Machine(CPU, kernels=False, fast_bf16=True)
GPU = Machine(CUDA, kernels=False, fast_bf16=False)
# checkpoints: exact GGUF blocks (the default model), plain fp32/bf16 weights, a family only transformers runs
BLOCKS = Checkpoint(runner=True, in_blocks=True)
PLAIN = Checkpoint(runner=True, in_blocks=False)
OTHER = Checkpoint(runner=False, in_blocks=False)

# (--dtype, --weight-dtype, --adapter-dtype, machine, checkpoint) ->
#     (compute, weights, keep blocks, long prefill products in bf16, banks)
TABLE = [
    # the default: the default model on each machine
    (("auto", "auto", "auto", XEON, BLOCKS), (F32, F32, True, False, F32)),
    (("auto", "auto", "auto", EPYC, BLOCKS), (F32, F32, True, True, BF16)),
    (("auto", "auto", "auto", BARE, BLOCKS), (F32, F32, False, False, F32)),
    (("auto", "auto", "auto", BARE_BF16, BLOCKS), (BF16, BF16, False, False, BF16)),
    (("auto", "auto", "auto", GPU, BLOCKS), (BF16, BF16, False, False, BF16)),
    # plain checkpoints: bf16 where the hardware computes it fast
    (("auto", "auto", "auto", XEON, PLAIN), (F32, F32, True, False, F32)),
    (("auto", "auto", "auto", EPYC, PLAIN), (BF16, BF16, False, False, BF16)),
    (("auto", "auto", "auto", GPU, OTHER), (BF16, BF16, False, False, BF16)),
    (("auto", "auto", "auto", EPYC, OTHER), (BF16, BF16, False, False, BF16)),
    # a setting that reads fp32 only makes auto fp32
    (("auto", "float32", "auto", EPYC, BLOCKS), (F32, F32, False, False, F32)),
    (("auto", "auto", "float32", EPYC, BLOCKS), (F32, F32, True, True, F32)),
    (("auto", "auto", "float32", EPYC, PLAIN), (F32, F32, True, False, F32)),
    (("auto", "auto", "float32", GPU, PLAIN), (F32, F32, False, False, F32)),
    # explicit compute: never the long products in bf16 (that is auto's reading)
    (("float32", "auto", "auto", EPYC, BLOCKS), (F32, F32, True, False, F32)),
    (("bfloat16", "auto", "auto", EPYC, BLOCKS), (BF16, BF16, False, False, BF16)),
    (("float16", "auto", "auto", GPU, PLAIN), (F16, F16, False, False, F16)),
    # bf16 weights under fp32 compute on a CPU, widened by the kernels; banks as the weights unless asked
    (("float32", "bfloat16", "auto", XEON, PLAIN), (F32, BF16, False, False, BF16)),
    (("auto", "bfloat16", "auto", XEON, BLOCKS), (F32, BF16, False, False, BF16)),
    (("float32", "bfloat16", "float32", XEON, PLAIN), (F32, BF16, False, False, F32)),
    (("float32", "auto", "bfloat16", XEON, PLAIN), (F32, F32, True, False, BF16)),
    (("bfloat16", "auto", "bfloat16", GPU, PLAIN), (BF16, BF16, False, False, BF16)),
    # the transformers path: its model's dtype for everything
    (("float32", "auto", "auto", XEON, OTHER), (F32, F32, False, False, F32)),
    (("auto", "auto", "float32", EPYC, OTHER), (F32, F32, False, False, F32)),
]

REFUSED = [
    (("float32", "bfloat16", "auto", BARE, PLAIN), "--weight-dtype bfloat16: hotlora's C kernels"),
    (("float32", "bfloat16", "auto", GPU, PLAIN), "only bfloat16 weights with float32 compute on a CPU"),
    (("float32", "bfloat16", "auto", XEON, OTHER), "--weight-dtype bfloat16 needs hotlora's runner"),
    (("float32", "auto", "bfloat16", BARE, PLAIN), "--adapter-dtype bfloat16 needs hotlora's C LoRA kernel"),
    (("float32", "auto", "bfloat16", GPU, PLAIN), "bf16 under fp32 on a CPU only"),
    (("bfloat16", "auto", "float32", EPYC, PLAIN), "--adapter-dtype float32 under bfloat16 compute"),
    (("float32", "auto", "bfloat16", XEON, OTHER), "--adapter-dtype bfloat16 needs hotlora's runner"),
]


@pytest.mark.parametrize(("given", "want"), TABLE, ids=lambda v: "-".join(map(str, v)) if len(v) == 5 else "")
def test_flags_machine_and_checkpoint_give_one_precision(given, want):
    dtype, weights, banks, machine, checkpoint = given
    got = resolve_precision(dtype, weights, banks, machine, checkpoint)
    assert isinstance(got, Precision)
    assert (got.compute, got.weights, got.keep_blocks, got.long_products_bf16, got.banks) == want
    assert got.describe().startswith(f"compute {str(want[0]).removeprefix('torch.')}")


@pytest.mark.parametrize(("given", "match"), REFUSED)
def test_combinations_that_cannot_run_here_are_refused_naming_the_flag(given, match):
    dtype, weights, banks, machine, checkpoint = given
    with pytest.raises(ValueError, match=match):
        resolve_precision(dtype, weights, banks, machine, checkpoint)


def test_auto_says_why_when_it_departs_from_the_hardwares_default():
    on_blocks = resolve_precision("auto", "auto", "auto", EPYC, BLOCKS)
    assert "exact GGUF blocks" in on_blocks.why and "long prefill chunks in bf16" in on_blocks.describe()
    assert "--adapter-dtype float32" in resolve_precision("auto", "auto", "float32", GPU, PLAIN).why
    assert resolve_precision("float32", "auto", "auto", EPYC, BLOCKS).why == ""


def test_the_server_resolves_its_precision_once_and_logs_it(tiny_model_dir, tmp_path, caplog):
    import logging

    from hotlora.server.model_loading import load_model

    with caplog.at_level(logging.INFO, logger="hotlora.model"):
        loaded = load_model(str(tiny_model_dir), str(tmp_path), device="cpu", dtype="float32")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision:")]
    assert lines == [f"precision: {loaded.precision.describe()}"]
    assert loaded.dtype == loaded.precision.compute == loaded.model.dtype == F32
