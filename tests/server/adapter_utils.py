"""Adapters made with the peft library itself, for serving tests."""

from __future__ import annotations

from pathlib import Path

import torch

from hotlora.v1 import adapters_pb2


def make_peft_adapter(
    out_dir: Path,
    seed: int,
    *,
    model_dir=None,
    task="CAUSAL_LM",
    num_labels=3,
    std: float = 0.3,
    **lora_kwargs,
) -> Path:
    """Random non-zero A and B (peft initialises B to zero), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    from tests.tiny import build_tiny_llama, tiny_llama_config

    if task == "SEQ_CLS":
        from transformers import LlamaForSequenceClassification

        torch.manual_seed(0)
        base = LlamaForSequenceClassification(tiny_llama_config(num_labels=num_labels)).eval()
        base.model.load_state_dict(build_tiny_llama().model.state_dict())
    else:
        base = build_tiny_llama()
    cfg = LoraConfig(task_type=task, **lora_kwargs)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or ("score" in name and p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def upload_chunks(name: str, directory: Path, labels=(), chunk=4096):
    yield adapters_pb2.UploadChunk(name=name, labels=list(labels))
    for fname in ("adapter_config.json", "adapter_model.safetensors"):
        data = (Path(directory) / fname).read_bytes()
        for off in range(0, len(data), chunk):
            yield adapters_pb2.UploadChunk(filename=fname, data=data[off : off + chunk])


def round_lora_to_bf16(model) -> None:
    """The adapter's A and B rounded to bf16 and back, as --adapter-dtype bfloat16 serves them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(torch.bfloat16).float())


def peft_greedy(
    adapter_dir: Path, prompt_ids: list[int], max_new_tokens: int, lora_bf16: bool = False, base=None
) -> list[int]:
    """`base`: a function building the base model (the tiny Llama by default)."""
    from peft import PeftModel

    from tests.tiny import build_tiny_llama

    model = PeftModel.from_pretrained((base or build_tiny_llama)(), str(adapter_dir)).eval()
    if lora_bf16:
        round_lora_to_bf16(model)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=3,
        )
    return out[0, len(prompt_ids) :].tolist()


def make_seq_cls_adapter(out_dir: Path) -> Path:
    """The tests' 3-label classification adapter: rank 4 on q_proj and v_proj, seed 7."""
    return make_peft_adapter(
        out_dir, seed=7, task="SEQ_CLS", num_labels=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
