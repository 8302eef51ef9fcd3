"""Baseline inference benchmark: our engine vs transformers (vs llama.cpp when importable).

Each backend runs in its own subprocess so load time and peak RSS are its own. Same prompt, same
greedy decoding, same number of new tokens (EOS ignored), same thread count.

    python benchmarks/engine.py                      # 2 threads, 64 new tokens
    python benchmarks/engine.py --tokens 128 --json benchmarks/out/engine.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_ours(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from inference.engine import Engine
    from inference.engine.loaders import prepare_default_model

    start = time.perf_counter()
    prepare_default_model(args.cache_dir)  # converted beforehand by the parent; this only checks
    engine = Engine.load(cache_dir=args.cache_dir, dtype=args.dtype)
    load_s = time.perf_counter() - start
    prompt_ids = engine.tokenize(engine.render(PROMPT))

    def run(adapters=None, n_seqs=1):
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

    run()  # warm-up
    single = run()
    result = {"backend": "r3mes engine (PyTorch eager)", "load_s": load_s, "prompt_tokens": len(prompt_ids), **single}
    if args.adapters:
        import torch as _t

        gen = _t.Generator().manual_seed(0)
        for name in ("a", "b", "c"):
            engine.new_adapter(name, r=8, alpha=16)
        with _t.no_grad():
            from inference.engine.dora import dora_modules

            for layer in dora_modules(engine.model).values():
                for name in ("a", "b", "c"):
                    layer.lora_B[name].copy_(_t.randn(layer.lora_B[name].shape, generator=gen) * 0.01)
                layer.rebuild()
        mix = run(adapters=[{"a": 0.5, "b": 0.3, "c": 0.2}])
        result["mixture3_decode_tok_s"] = mix["decode_tok_s"]
        mixes = [{"a": 1 + i % 3, "b": 1 + (i // 3) % 3, "c": 1 + i % 2} for i in range(8)]
        batch8 = run(adapters=mixes, n_seqs=8)
        result["batch8_mixtures_aggregate_tok_s"] = batch8["decode_tok_s"]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


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
    return {"backend": "llama.cpp (llama-cpp-python)", "load_s": load_s, "prompt_tokens": len(ids), **run(),
            "peak_rss_mb": peak_rss_mb()}


BACKENDS = {"ours": bench_ours, "transformers": bench_transformers, "llama_cpp": bench_llama_cpp}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--backend", choices=sorted(BACKENDS), help="(internal) run one backend and print JSON")
    parser.add_argument("--no-adapters", dest="adapters", action="store_false")
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
    backends = ["ours", "transformers"]
    skipped = {}
    if importlib.util.find_spec("llama_cpp"):
        backends.append("llama_cpp")
    else:
        skipped["llama_cpp"] = "llama_cpp (llama-cpp-python) is not installed"
    load_before = os.getloadavg()
    results = []
    for name in backends:
        cmd = [sys.executable, __file__, "--backend", name, "--threads", str(args.threads), "--tokens",
               str(args.tokens), "--dtype", args.dtype] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        cmd += [] if args.adapters else ["--no-adapters"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            skipped[name] = f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            continue
        results.append(json.loads(line[7:]))
    ours = next((r for r in results if r["backend"].startswith("r3mes")), None)
    print(f"\nthreads={args.threads} dtype={args.dtype} new tokens={args.tokens} "
          f"load average before/after: {load_before[0]:.2f}/{os.getloadavg()[0]:.2f}")
    print(f"{'backend':48} {'load s':>7} {'prefill s':>9} {'decode tok/s':>12} {'ours ÷ it':>9} {'peak RSS MB':>11}")
    for r in results:
        ratio = ours["decode_tok_s"] / r["decode_tok_s"] if ours else float("nan")
        print(f"{r['backend']:48} {r['load_s']:7.2f} {r['prefill_s']:9.3f} {r['decode_tok_s']:12.2f} {ratio:9.2f} "
              f"{r['peak_rss_mb']:11.0f}")
    if ours and "mixture3_decode_tok_s" in ours:
        print(f"ours, 3-adapter DoRA mixture: {ours['mixture3_decode_tok_s']:.2f} tok/s "
              f"({ours['mixture3_decode_tok_s'] / ours['decode_tok_s']:.2f}× no adapter)")
        print(f"ours, 8 sequences × 8 different 3-adapter mixtures: {ours['batch8_mixtures_aggregate_tok_s']:.2f} "
              f"tok/s aggregate ({ours['batch8_mixtures_aggregate_tok_s'] / ours['decode_tok_s']:.2f}× single stream)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "skipped": skipped,
                                               "loadavg_before": load_before}, indent=2))


if __name__ == "__main__":
    main()
