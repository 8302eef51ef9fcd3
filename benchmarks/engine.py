"""Engine benchmark: our precision modes side by side with llama.cpp (when importable), the engine
before the speed work (--baseline-src) and transformers (--transformers), plus a BitNet-shaped check.

Each backend runs in its own subprocess so load time and peak RSS are its own. Same prompt, same
greedy decoding, same number of new tokens (EOS ignored), same thread count. Our modes share one
process (each a copy of the same loaded weights) and report decode and 512-token prefill speed,
quality against float32 (greedy agreement and mean KL, teacher-forced on float32's continuation of
fixed prompts), a 3-adapter DoRA mixture and 8 concurrent sequences with 8 different mixtures.
A mode suffixed "+compiled" (int4+compiled) also builds the torch.compile'd single-sequence decode
graph (Engine.compile_decode, what the worker serves with): its single-stream decode and both
sides of its "mixture ÷ no adapter" run in the graphs (the mixture's ranks sum to 24, the graphs'
width); batches of several sequences stay eager. `compile_s` is that compile (Inductor's on-disk
cache, usually /tmp/torchinductor_$USER, makes a second run faster).

    python benchmarks/engine.py                      # 2 threads, 64 new tokens
    python benchmarks/engine.py --tokens 128 --json benchmarks/out/engine.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


QUALITY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which",
    "Write a short poem about the sea.",
]
MODES = {  # name -> (dtype, quant)
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": ("float32", "int8"),
    "int4": ("float32", "int4"),
}


def long_prompt_ids(engine, n: int) -> list[int]:
    text = "The history of the steam engine begins with simple devices and ends with locomotives. " * 80
    ids = engine.tokenize(text)
    return ids[:n]


def timed_runs(engine, prompt_ids, args, adapters=None, n_seqs=1) -> dict:
    batch = engine.new_batch(max_batch=n_seqs, max_seq_len=len(prompt_ids) + args.tokens + 8)
    seqs = [engine.sequence(PROMPT, max_tokens=args.tokens, ignore_eos=True, adapters=adapters[i] if adapters else None)
            for i in range(n_seqs)]
    for s in seqs:
        batch.add(s)
    t0 = time.perf_counter()
    batch.step()  # prefill + first token of every sequence
    t1 = time.perf_counter()
    while len(batch):
        batch.step()
    t2 = time.perf_counter()
    new = sum(len(s.output_ids) for s in seqs) - n_seqs
    return {"prefill_s": t1 - t0, "decode_tok_s": new / (t2 - t1), "tokens": new + n_seqs}


def prefill_tok_s(engine, ids) -> float:
    import torch

    from inference.engine.generate import prefill

    engine.model.setup_caches(1, len(ids) + 8)
    with torch.inference_mode():
        tokens = torch.tensor(ids)
        prefill(engine.model, tokens, 0, None)  # warm-up
        t0 = time.perf_counter()
        prefill(engine.model, tokens, 0, None)
        return len(ids) / (time.perf_counter() - t0)


def add_random_adapters(engine) -> None:
    import torch

    from inference.engine.dora import dora_modules

    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b", "c"):
        engine.new_adapter(name, r=8, alpha=16)
    with torch.no_grad():
        for layer in dora_modules(engine.model).values():
            for name in ("a", "b", "c"):
                layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen) * 0.01)
                layer.lora_magnitude_vector[name].mul_(1 + 0.05 * torch.randn(layer.lora_magnitude_vector[name].shape,
                                                                               generator=gen))
            layer.rebuild()


def bench_ours(args) -> dict:
    """Every precision mode from one load of the weights (each mode a copy), side by side."""
    import copy

    import torch

    torch.set_num_threads(args.threads)
    from inference.engine import Engine
    from inference.engine.loaders import load_model, prepare_default_model
    from inference.engine.speed import optimize_model

    start = time.perf_counter()
    path = prepare_default_model(args.cache_dir)
    base, tokenizer = load_model(path)
    load_s = time.perf_counter() - start
    results, reference = [], None
    for mode in args.modes.split(","):
        # "<mode>+compiled": the same weights, single-stream decode through Engine.compile_decode
        compiled = mode.endswith("+compiled")
        dtype, quant = MODES[mode.removesuffix("+compiled")]
        t = time.perf_counter()
        model = copy.deepcopy(base).to(getattr(torch, dtype))
        optimize_model(model, quant=quant)
        engine = Engine(model, tokenizer, str(path), getattr(torch, dtype), torch.device("cpu"))
        prep_s = time.perf_counter() - t
        compile_s = None
        if compiled:
            engine.new_batch(max_batch=8, max_seq_len=1024)  # the cache every later batch fits in
            t = time.perf_counter()
            if not engine.compile_decode():
                raise SystemExit(f"{mode}: compile_decode failed (see the log)")
            compile_s = time.perf_counter() - t
        prompt_ids = engine.tokenize(engine.render(PROMPT))
        timed_runs(engine, prompt_ids, args)  # warm-up
        r = {"backend": f"r3mes engine {mode}", "mode": mode, "load_s": load_s + prep_s, "prompt_tokens": len(prompt_ids),
             "compile_s": compile_s, **timed_runs(engine, prompt_ids, args)}
        r["prefill512_tok_s"] = prefill_tok_s(engine, long_prompt_ids(engine, 512))
        # Quality against float32: teacher-forced over float32's own greedy continuation.
        if reference is None and mode != "float32":
            raise SystemExit("--modes must start with float32 (the quality reference)")
        if mode == "float32":
            reference = []
            for text in QUALITY_PROMPTS:
                ids = engine.tokenize(text)
                out = "".join(engine.generate(text, max_tokens=32, ignore_eos=True))
                full = ids + engine.tokenize(out)[:32]
                reference.append((full, len(ids), engine.logits(full)))
        agree, kls = [], []
        for full, n_prompt, ref_logits in reference:
            lg = engine.logits(full)
            sl = slice(n_prompt - 1, None)
            agree.append((lg[sl].argmax(-1) == ref_logits[sl].argmax(-1)).float().mean().item())
            kls.append(torch.nn.functional.kl_div(lg[sl].log_softmax(-1), ref_logits[sl].log_softmax(-1),
                                                  log_target=True, reduction="none").sum(-1).mean().item())
        r["greedy_agreement"] = sum(agree) / len(agree)
        r["mean_kl"] = sum(kls) / len(kls)
        if args.adapters:
            add_random_adapters(engine)
            # The ratio alternates plain and mixture runs (--mix-repeats pairs) and compares medians:
            # back-to-back single runs swung by 30 % on this shared machine.
            plain, mixed = [], []
            for _ in range(args.mix_repeats):
                plain.append(timed_runs(engine, prompt_ids, args)["decode_tok_s"])
                mixed.append(timed_runs(engine, prompt_ids, args, adapters=[{"a": 0.5, "b": 0.3, "c": 0.2}])[
                    "decode_tok_s"])
            r["mixture3_decode_tok_s"] = statistics.median(mixed)
            r["mixture3_ratio"] = statistics.median(mixed) / statistics.median(plain)
            mixes = [{"a": 1 + i % 3, "b": 1 + (i // 3) % 3, "c": 1 + i % 2} for i in range(8)]
            r["batch8_mixtures_aggregate_tok_s"] = timed_runs(engine, prompt_ids, args, adapters=mixes, n_seqs=8)[
                "decode_tok_s"]
        r["weights_mb"] = engine.capabilities()["memory"]["weights_bytes"] / 1e6
        print(f"  {mode}: {json.dumps(r)}", file=sys.stderr, flush=True)
        results.append(r)
        del engine, model
    return {"results": results, "peak_rss_mb": peak_rss_mb()}


def bench_baseline(args) -> dict:
    """The engine as it was before the speed work (a source tree passed with --baseline-src)."""
    import torch

    torch.set_num_threads(args.threads)
    # The parent passes the old tree as PYTHONPATH; it must win over this checkout (ROOT, first).
    src = args.baseline_src or os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    sys.path.insert(0, src)
    import inference.engine
    from inference.engine import Engine

    if not inference.engine.__file__.startswith(os.path.abspath(src)):
        raise SystemExit(f"baseline imported {inference.engine.__file__}, not the tree in {src}")
    start = time.perf_counter()
    engine = Engine.load(cache_dir=args.cache_dir)
    load_s = time.perf_counter() - start
    prompt_ids = engine.tokenize(engine.render(PROMPT))
    timed_runs(engine, prompt_ids, args)
    r = {"backend": "r3mes engine float32, before speed work", "load_s": load_s, "prompt_tokens": len(prompt_ids),
         **timed_runs(engine, prompt_ids, args)}
    ids = long_prompt_ids(engine, 512)
    engine.model.setup_caches(1, len(ids) + 8)
    from inference.engine.generate import prefill

    with torch.inference_mode():
        prefill(engine.model, torch.tensor(ids), 0, None)
        t0 = time.perf_counter()
        prefill(engine.model, torch.tensor(ids), 0, None)
        r["prefill512_tok_s"] = len(ids) / (time.perf_counter() - t0)
    r["peak_rss_mb"] = peak_rss_mb()
    return r


def bench_transformers(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaForCausalLM

    from inference.engine.loaders import default_gguf_path

    gguf = default_gguf_path()
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    load_s = time.perf_counter() - start
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

    def run():
        kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t1 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **kw)
            t2 = time.perf_counter()
        new = out.shape[1] - ids.shape[1]
        # decode time = full run minus a prefill-only run
        return {"prefill_s": t1 - t0, "decode_tok_s": (new - 1) / ((t2 - t1) - (t1 - t0)), "tokens": new}

    run()
    return {"backend": f"transformers {__import__('transformers').__version__} (gguf_file=, eager)", "load_s": load_s,
            "prompt_tokens": ids.shape[1], **run(), "peak_rss_mb": peak_rss_mb()}


def bench_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    from inference.engine.loaders import default_gguf_path

    start = time.perf_counter()
    llm = Llama(model_path=str(default_gguf_path()), n_threads=args.threads, n_ctx=1024, verbose=False)
    load_s = time.perf_counter() - start
    from inference.engine import Engine

    engine = Engine.load(cache_dir=args.cache_dir)  # same prompt tokens as ours
    ids = engine.tokenize(engine.render(PROMPT))
    del engine

    def run():
        llm.reset()
        t0 = time.perf_counter()
        n = 0
        t1 = None
        for _ in llm.generate(ids, temp=0.0, top_k=1):
            n += 1
            if n == 1:
                t1 = time.perf_counter()
            if n >= args.tokens:
                break
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_tok_s": (n - 1) / (t2 - t1), "tokens": n}

    run()
    r = {"backend": "llama.cpp (llama-cpp-python)", "load_s": load_s, "prompt_tokens": len(ids), **run()}
    text = "The history of the steam engine begins with simple devices and ends with locomotives. " * 80
    long_ids = llm.tokenize(text.encode(), add_bos=False)[:512]
    llm.reset()
    llm.eval(long_ids)  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long_ids)
    r["prefill512_tok_s"] = len(long_ids) / (time.perf_counter() - t0)
    r["peak_rss_mb"] = peak_rss_mb()
    return r


def bench_bitnet(args) -> dict:
    """A random checkpoint with BitNet b1.58 2B-4T shapes (dim 2560, hidden 6912, 20/5 heads),
    a few layers: resident bits per linear weight and decode speed of the packed int8 kernel
    against unpacking the 2-bit weights to bfloat16 / float32 on every call."""
    import torch

    torch.set_num_threads(args.threads)
    from inference.engine.bitlinear import BitLinear, pack_ternary
    from inference.engine.generate import decode_one_token, prefill
    from inference.engine.model import ModelConfig, Transformer
    from inference.engine.speed import linear_weight_bits

    cfg = ModelConfig(vocab_size=4096, dim=2560, n_layers=args.bitnet_layers, n_heads=20, n_kv_heads=5,
                      hidden_dim=6912, rope_theta=500000.0, arch="bitnet", ternary=True, max_seq_len=256,
                      tie_embeddings=True, name="random-bitnet-2b4t-shapes")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.weight.copy_(pack_ternary(torch.randint(-1, 2, (m.out_features, m.in_features))))
                m.weight_scale.fill_(0.02)
        model.model.embed_tokens.weight.normal_(0, 0.02)
    out = {"backend": "BitNet 2B4T shapes (random)", "layers": cfg.n_layers, "bits_per_linear_weight":
           linear_weight_bits(model)}

    def decode(n=16):
        model.setup_caches(1, 64)
        with torch.inference_mode():
            prefill(model, torch.arange(8), 0, None)
            tok, slots = torch.tensor([1]), torch.tensor([0])
            decode_one_token(model, tok, torch.tensor([8]), slots, None)  # warm-up
            t0 = time.perf_counter()
            for i in range(n):
                decode_one_token(model, tok, torch.tensor([9 + i]), slots, None)
            return n / (time.perf_counter() - t0)

    BitLinear.int8_kernel = True
    out["packed_int8_tok_s"] = decode()
    BitLinear.int8_kernel = False
    out["unpack_fp32_tok_s"] = decode()
    model.to(torch.bfloat16)
    out["unpack_bf16_tok_s"] = decode()
    BitLinear.int8_kernel = False
    out["peak_rss_mb"] = peak_rss_mb()
    return out


BACKENDS = {"ours": bench_ours, "baseline": bench_baseline, "transformers": bench_transformers,
            "llama_cpp": bench_llama_cpp, "bitnet": bench_bitnet}


def run_backend(name, args, extra_env=None) -> tuple[dict | None, str | None]:
    cmd = [sys.executable, __file__, "--backend", name, "--threads", str(args.threads), "--tokens", str(args.tokens),
           "--dtype", args.dtype, "--modes", args.modes, "--bitnet-layers", str(args.bitnet_layers),
           "--mix-repeats", str(args.mix_repeats)]
    cmd += (["--cache-dir", args.cache_dir] if args.cache_dir else []) + ([] if args.adapters else ["--no-adapters"])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return None, f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    return json.loads(line[7:]), None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mix-repeats", type=int, default=3, help="plain/mixture run pairs for the mixture ratio")
    parser.add_argument("--dtype", default="float32", help="(transformers backend)")
    parser.add_argument("--modes", default="float32,bfloat16,int8,int4,int4+compiled",
                        help="our precision modes, float32 first")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--backend", choices=sorted(BACKENDS), help="(internal) run one backend and print JSON")
    parser.add_argument("--no-adapters", dest="adapters", action="store_false")
    parser.add_argument("--baseline-src", help="source tree of the engine before the speed work (e.g. "
                        "`git archive engine-base | tar -x -C /tmp/base`), run side by side")
    parser.add_argument("--transformers", action="store_true", help="also run transformers (slow)")
    parser.add_argument("--bitnet-layers", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated backends to skip (llama_cpp, bitnet)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.backend:
        print("RESULT " + json.dumps(BACKENDS[args.backend](args)))
        return

    import importlib.util

    from inference.engine.loaders import prepare_default_model

    t = time.perf_counter()
    converted = prepare_default_model(args.cache_dir)
    print(f"converted model: {converted} ({time.perf_counter() - t:.1f}s, 0 if cached)")
    skip = set(filter(None, args.skip.split(",")))
    load_before = os.getloadavg()
    results, skipped, bitnet = [], {}, None
    jobs = [("ours", None)]
    if args.baseline_src:
        jobs.append(("baseline", {"PYTHONPATH": args.baseline_src}))
    if args.transformers:
        jobs.append(("transformers", None))
    if "llama_cpp" in skip:
        skipped["llama_cpp"] = "--skip"
    elif importlib.util.find_spec("llama_cpp"):
        jobs.append(("llama_cpp", None))
    else:
        skipped["llama_cpp"] = "llama_cpp (llama-cpp-python) is not installed"
    if "bitnet" not in skip:
        jobs.append(("bitnet", None))
    for name, env in jobs:
        r, why = run_backend(name, args, env)
        if r is None:
            skipped[name] = why
        elif name == "ours":
            results.extend(r["results"])
        elif name == "bitnet":
            bitnet = r
        else:
            results.append(r)
    load_after = os.getloadavg()
    print(f"\nthreads={args.threads} new tokens={args.tokens} load average before/after: "
          f"{load_before[0]:.2f}/{load_after[0]:.2f}")
    llama = next((r for r in results if r["backend"].startswith("llama.cpp")), None)
    f32 = next((r for r in results if r.get("mode") == "float32"), None)
    print(f"{'backend':44} {'decode tok/s':>12} {'÷ llama.cpp':>11} {'÷ fp32':>7} {'prefill512 tok/s':>16} "
          f"{'÷ llama.cpp':>11} {'agree':>6} {'mean KL':>8} {'mix3 ÷ none':>11} {'8 mixes agg':>11} "
          f"{'÷ llama.cpp':>11} {'weights MB':>10}")

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    for r in results:
        mix_ratio = f"{r['mixture3_ratio']:.2f}" if "mixture3_ratio" in r else "-"
        agg = r.get("batch8_mixtures_aggregate_tok_s")
        print(f"{r['backend']:44} {r['decode_tok_s']:12.2f} {ratio(r['decode_tok_s'], llama and llama['decode_tok_s']):>11} "
              f"{ratio(r['decode_tok_s'], f32 and f32['decode_tok_s']):>7} {r.get('prefill512_tok_s', 0):16.1f} "
              f"{ratio(r.get('prefill512_tok_s'), llama and llama.get('prefill512_tok_s')):>11} "
              f"{r.get('greedy_agreement', float('nan')):6.3f} {r.get('mean_kl', float('nan')):8.4f} "
              f"{mix_ratio:>11} {agg or 0:11.1f} {ratio(agg, llama and llama['decode_tok_s']):>11} "
              f"{r.get('weights_mb', 0):10.0f}")
    if bitnet:
        print(f"\nBitNet 2B4T shapes, {bitnet['layers']} random layers: {bitnet['bits_per_linear_weight']:.3f} bits "
              f"resident per linear weight; decode packed int8 kernel {bitnet['packed_int8_tok_s']:.2f} tok/s, "
              f"unpack-to-bf16 {bitnet['unpack_bf16_tok_s']:.2f} tok/s "
              f"({bitnet['packed_int8_tok_s'] / bitnet['unpack_bf16_tok_s']:.2f}×), unpack-to-fp32 "
              f"{bitnet['unpack_fp32_tok_s']:.2f} tok/s ({bitnet['packed_int8_tok_s'] / bitnet['unpack_fp32_tok_s']:.2f}×)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "bitnet": bitnet,
                                               "skipped": skipped, "loadavg_before": load_before,
                                               "loadavg_after": load_after}, indent=2))


if __name__ == "__main__":
    main()
