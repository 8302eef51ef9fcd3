"""BitNet b1.58 (2B-4T body shapes) served by R3MES against llama.cpp on the same ternary weights.

Writes one random ternary model twice, once: our Hugging Face layout (transformers' 2B-4T packing,
`model_type: bitnet`) and a llama-architecture GGUF whose seven projections are TQ2_0 and whose
tied embedding/head is Q4_0 (4.5 bits a weight, against our int4 head's 5). Then two processes,
one per backend, each loaded once, take turns on the same work (2 threads each, never at the same
time): single-stream decode, decode with a 3-expert DoRA mixture (ours), 8 sequences with 8
different 3-expert mixtures (ours; aggregate), and a 512-token prefill. Reports the ratios the
issue asks for, bits a linear weight resident, peak RSS, and bytes a token read against this
machine's read bandwidth measured in the same run.

    pip install llama-cpp-python   # in the benchmark's environment, not the project's
    .venv/bin/python benchmarks/bitnet.py [--layers 30] [--rounds 3] [--compile] [--llama-python PY]

--compile times the served configuration (the worker compiles its decode step; minutes the first
time, cached under --dir). Without it the eager engine is timed.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

THREADS = 2
PROMPT = "In a community-run service, experts trained by miners are mixed per request."


# -- the two model files ---------------------------------------------------------------------------
def tq2_0_bytes(t: np.ndarray, scale: float) -> np.ndarray:
    """int8 ternary [rows, cols] -> TQ2_0 blocks (ggml-quants.c: 64 bytes of 2-bit values, element
    128 c + 32 l + i of a block in bits 2l of byte 32 c + i, then the fp16 scale)."""
    rows, cols = t.shape
    u = (t.astype(np.int16) + 1).astype(np.uint8).reshape(rows, cols // 256, 2, 4, 32)
    qs = u[:, :, :, 0] | u[:, :, :, 1] << 2 | u[:, :, :, 2] << 4 | u[:, :, :, 3] << 6  # [rows, blocks, 2, 32]
    d = np.full((rows, cols // 256, 2), 0, dtype=np.uint8)
    d[...] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return np.concatenate([qs.reshape(rows, cols // 256, 64), d], axis=-1).reshape(rows, -1)


def write_models(out: Path, layers: int) -> tuple[Path, Path]:
    import gguf
    import torch
    from safetensors import safe_open

    from inference.engine.bitlinear import unpack_ternary_int8
    from inference.engine.checkpoints import SHAPES_2B4T, write_random_bitnet
    from inference.engine.loaders import _gguf_fields, _gguf_reader
    from inference.engine.tokenizer import Tokenizer

    hf_dir, gguf_path = out / "bitnet-hf", out / "bitnet-tq2_0.gguf"
    if (hf_dir / "tokenizer.json").is_file() and gguf_path.is_file():
        return hf_dir, gguf_path
    shapes = dict(SHAPES_2B4T, n_layers=layers)
    vocab = shapes["vocab_size"]
    write_random_bitnet(hf_dir, **shapes, eos_token_id=vocab - 1)
    # A byte-level vocabulary padded to the 2B-4T's size: both engines tokenise alike.
    from tokenizers.pre_tokenizers import ByteLevel

    # (llama.cpp wants at least one merge)
    tokens = sorted(ByteLevel.alphabet()) + ["ĠĠ"] + [f"<|r3mes_{i}|>" for i in range(vocab - 257)]
    w = gguf.GGUFWriter(str(gguf_path), "llama")
    w.add_name("random BitNet b1.58 2B-4T body (TQ2_0)")
    w.add_block_count(shapes["n_layers"])
    w.add_context_length(shapes["max_seq_len"])
    w.add_embedding_length(shapes["dim"])
    w.add_feed_forward_length(shapes["hidden_dim"])
    w.add_head_count(shapes["n_heads"])
    w.add_head_count_kv(shapes["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.CONTROL] * (vocab - 257))
    w.add_token_merges(["Ġ Ġ"])
    w.add_eos_token_id(vocab - 1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    checked = False
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as st:
        embed = st.get_tensor("model.embed_tokens.weight").float().numpy()
        w.add_tensor("token_embd.weight", gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q4_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        w.add_tensor("output_norm.weight", st.get_tensor("model.norm.weight").float().numpy())
        for i in range(shapes["n_layers"]):
            p = f"model.layers.{i}."
            w.add_tensor(f"blk.{i}.attn_norm.weight", st.get_tensor(p + "input_layernorm.weight").float().numpy())
            w.add_tensor(f"blk.{i}.ffn_norm.weight", st.get_tensor(p + "post_attention_layernorm.weight").float().numpy())
            for hf, gg in names.items():
                t = unpack_ternary_int8(st.get_tensor(p + hf + ".weight")).numpy()
                scale = float(st.get_tensor(p + hf + ".weight_scale").float())
                raw = tq2_0_bytes(t, scale)
                if not checked:  # our TQ2_0 writer against gguf's own reader, once
                    back = gguf.quants.dequantize(raw[:4], gguf.GGMLQuantizationType.TQ2_0)
                    assert np.allclose(back, t[:4] * np.float16(scale).astype(np.float32)), "TQ2_0 layout"
                    checked = True
                w.add_tensor(f"blk.{i}.{gg}.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # our tokenizer files, from the GGUF's own vocabulary
    Tokenizer.from_gguf_fields(_gguf_fields(_gguf_reader(gguf_path)), str(gguf_path)).save(hf_dir)
    del torch
    return hf_dir, gguf_path


# -- the backends, each in its own process ---------------------------------------------------------
def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def serve_r3mes(args):
    """Our engine with the worker's settings (R3MES_QUANT=auto)."""
    import torch

    torch.set_num_threads(THREADS)
    if args.compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(args.dir) / "inductor"))
    from inference.engine import Engine, SamplingParams, Sequence
    from inference.engine.speed import linear_weight_bits

    engine = Engine.load(args.hf, quant="auto")
    # what a token reads: the fused projections' packed weights and the head (before DoRA wraps them)
    head_bytes = sum(b.numel() * b.element_size() for b in engine.model.lm_head.buffers())
    body_bytes = sum(m.weight.numel() for n, m in engine.model.named_modules()
                     if n.endswith(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")))
    rng = torch.Generator().manual_seed(0)
    for i in range(4):  # four experts, rank 16 on every projection, B moved off zero
        name = f"expert{i}"
        engine.new_adapter(name, r=16, alpha=32, seed=i)
        with torch.no_grad():
            for module in engine.model.modules():
                if hasattr(module, "lora_B") and name in module.lora_B:
                    module.lora_B[name].normal_(0, 0.01, generator=rng)
                    module.rebuild()
    batch = engine.new_batch(max_batch=8, max_seq_len=1024)
    compiled = engine.compile_decode(64) if args.compile else False
    info = {"serving": engine.capabilities()["serving"], "compiled": compiled,
            "bits_per_linear_weight": linear_weight_bits(engine.model), "bytes_per_token": body_bytes + head_bytes}
    mixtures = [{"expert0": 0.5, "expert1": 0.3, "expert2": 0.2}, {"expert1": 0.6, "expert2": 0.2, "expert3": 0.2},
                {"expert0": 0.2, "expert2": 0.4, "expert3": 0.4}, {"expert0": 0.34, "expert1": 0.33, "expert3": 0.33},
                {"expert0": 0.7, "expert1": 0.2, "expert2": 0.1}, {"expert1": 0.1, "expert2": 0.1, "expert3": 0.8},
                {"expert0": 0.1, "expert2": 0.8, "expert3": 0.1}, {"expert0": 0.4, "expert1": 0.4, "expert3": 0.2}]

    def decode(tokens, adapters=None):
        seq = engine.sequence(PROMPT, max_tokens=tokens, ignore_eos=True, adapters=adapters)
        batch.add(seq)
        first = None
        while len(batch):
            batch.step()
            if first is None:
                first = time.perf_counter()
        return (len(seq.output_ids) - 1) / (time.perf_counter() - first)

    def aggregate(tokens):
        seqs = [engine.sequence(PROMPT + f" ({i})", max_tokens=tokens, ignore_eos=True, adapters=m)
                for i, m in enumerate(mixtures)]
        for s in seqs:
            batch.add(s)
        start = time.perf_counter()
        while len(batch):
            batch.step()
        return sum(len(s.output_ids) for s in seqs) / (time.perf_counter() - start)

    def prefill(n):
        ids = (engine.tokenize(PROMPT) * (n // 8 + 1))[:n]
        batch.add(Sequence(ids, SamplingParams(max_tokens=1, ignore_eos=True)))
        start = time.perf_counter()
        batch.step()
        while len(batch):
            batch.step()
        return n / (time.perf_counter() - start)

    return info, {"decode": lambda: decode(args.tokens), "mixture": lambda: decode(args.tokens, mixtures[0]),
                  "batch8": lambda: aggregate(args.tokens), "prefill": lambda: prefill(512)}


def serve_llama(args):
    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=512,
                verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False)

    def decode(tokens):
        llm.reset()
        llm.eval(prompt)
        tok = prompt[-1]
        first = None
        for i in range(tokens):
            llm.eval([tok])
            if first is None:
                first = time.perf_counter()
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return (tokens - 1) / (time.perf_counter() - first)

    def prefill(n):
        ids = (prompt * (n // len(prompt) + 1))[:n]
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return n / (time.perf_counter() - start)

    info = {"serving": "llama.cpp (llama-cpp-python), TQ2_0 body, Q4_0 head"}
    return info, {"decode": lambda: decode(args.tokens), "prefill": lambda: prefill(512)}


def child(args):
    """One backend: load, say what it runs, then run each job named on stdin."""
    info, jobs = (serve_r3mes if args.backend == "r3mes" else serve_llama)(args)
    print(json.dumps({"ready": info, "rss_gb": peak_rss_gb()}), flush=True)
    for line in sys.stdin:
        job = line.strip()
        value = jobs[job]() if job in jobs else None
        print(json.dumps({"job": job, "value": value, "rss_gb": peak_rss_gb()}), flush=True)


def read_bandwidth() -> float:
    """GB/s two threads read from memory: the sum of 1 GiB of float32 (light compute)."""
    import torch

    torch.set_num_threads(THREADS)
    data = torch.ones(1 << 28)
    data.sum()
    start = time.perf_counter()
    for _ in range(5):
        data.sum()
    return 5 * data.numel() * 4 / (time.perf_counter() - start) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(ROOT / "var" / "bench-bitnet"))
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="the Python that has llama_cpp (llama-cpp-python) installed, if not this one")
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--hf", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        return child(args)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    hf_dir, gguf_path = write_models(out, args.layers)
    print(f"models ready in {time.perf_counter() - started:.0f} s: {hf_dir}, {gguf_path}", flush=True)
    procs = {}
    for backend in ("r3mes", "llama"):
        python = args.llama_python if backend == "llama" else sys.executable
        cmd = [python, __file__, "--backend", backend, "--hf", str(hf_dir), "--gguf", str(gguf_path),
               "--dir", args.dir, "--tokens", str(args.tokens)] + (["--compile"] if args.compile else [])
        procs[backend] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                          env=dict(os.environ, OMP_NUM_THREADS=str(THREADS)))
    ready = {b: json.loads(p.stdout.readline()) for b, p in procs.items()}

    def ask(backend, job):
        procs[backend].stdin.write(job + "\n")
        procs[backend].stdin.flush()
        return json.loads(procs[backend].stdout.readline())

    results = {b: {} for b in procs}
    rss = {b: ready[b]["rss_gb"] for b in procs}
    for r in range(args.rounds):
        for job in ("decode", "mixture", "batch8", "prefill"):
            for backend in ("llama", "r3mes") if r % 2 == 0 else ("r3mes", "llama"):
                reply = ask(backend, job)
                if reply["value"] is not None:
                    results[backend].setdefault(job, []).append(reply["value"])
                rss[backend] = max(rss[backend], reply["rss_gb"])
        print(f"round {r + 1}: " + json.dumps({b: {j: round(v[-1], 2) for j, v in res.items()}
                                                for b, res in results.items()}), flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    bandwidth = read_bandwidth()
    med = {b: {j: float(np.median(v)) for j, v in res.items()} for b, res in results.items()}
    ours, llama = med["r3mes"], med["llama"]
    info = ready["r3mes"]["ready"]
    bytes_s = info["bytes_per_token"] * ours["decode"]
    report = {
        "r3mes": info["serving"] + (" (compiled decode)" if info["compiled"] else " (eager decode)"),
        "llama.cpp": ready["llama"]["ready"]["serving"],
        "layers": args.layers, "tokens": args.tokens, "rounds": args.rounds, "threads": THREADS,
        "tok_s": med,
        "decode_vs_llama_cpp": ours["decode"] / llama["decode"],
        "mixture3_vs_no_mixture": ours["mixture"] / ours["decode"],
        "batch8_mixtures_aggregate_vs_llama_cpp_single": ours["batch8"] / llama["decode"],
        "prefill512_vs_llama_cpp": ours["prefill"] / llama["prefill"],
        "bits_per_linear_weight": info["bits_per_linear_weight"],
        "peak_rss_gb": rss,
        "bytes_per_token_gb": info["bytes_per_token"] / 1e9,
        "read_bandwidth_gb_s": bandwidth,
        "achieved_gb_s": bytes_s / 1e9,
        "achieved_vs_bandwidth": bytes_s / 1e9 / bandwidth,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
