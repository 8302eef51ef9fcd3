"""Triton kernels benchmark (issue 9 item 4): the W2A8 ternary matmul against a bf16 matmul at the
BitNet 2B-4T shapes (2560 x 6912, both directions), for decode (M=1) and prefill (M=512), and the
fused DoRA mixture against the PyTorch two-matmul path, side by side in one run, timed with CUDA
events. Needs a CUDA GPU and `pip install -r requirements-gpu.txt`; without CUDA it says so and
still runs what can run here: the kernels in Triton's interpreter against the PyTorch paths (small
shapes) and an ahead-of-time compile for sm_90 (H100) through Triton's bundled ptxas.

    python benchmarks/triton_kernels.py                 # everything this machine can run
    python benchmarks/triton_kernels.py --json benchmarks/out/triton.json
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from inference.engine import triton_kernels as tk  # noqa: E402
from inference.engine.bitlinear import BitLinear, pack_ternary  # noqa: E402

DIM, HIDDEN = 2560, 6912  # BitNet b1.58 2B-4T: hidden size, MLP width
SHAPES = {"up/gate 2560->6912": (DIM, HIDDEN), "down 6912->2560": (HIDDEN, DIM)}  # name -> (K, N)


def random_layer(k: int, n: int, device, divide_scale=False) -> tuple[BitLinear, torch.Tensor]:
    layer = BitLinear(k, n, dtype=torch.bfloat16, device=device, divide_scale=divide_scale)
    q = torch.randint(-1, 2, (n, k), device=device)
    layer.weight.copy_(pack_ternary(q))
    layer.weight_scale.fill_(0.37)
    layer.int8_kernel = True
    return layer, q


def cuda_time_us(fn, repeat: int = 50, rounds: int = 5) -> float:
    """Median over `rounds` of the mean time of `repeat` back-to-back calls, between CUDA events."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / repeat)
    return statistics.median(times)


def bench_w2a8_cuda(prefill_m: int, dev="cuda", shapes=SHAPES) -> list[dict]:
    rows = []
    for name, (k, n) in shapes.items():
        layer, q = random_layer(k, n, dev)
        w_bf16 = (q.to(torch.bfloat16) * 0.37).contiguous()  # the dense bf16 weight of the same layer
        for m in (1, prefill_m):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            with torch.inference_mode():
                # correctness on the GPU: with unit scales the output is the integer sums themselves
                xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
                ones = torch.ones(m, device=dev)
                acc = tk.w2a8_matmul(xq, ones, layer.weight, torch.ones(1, device=dev), False)
                exact = bool(torch.equal(acc.double(), xq.double() @ q.double().T))
                # and the whole layer equals the CPU int8 path bit for bit
                cpu_layer = copy.deepcopy(layer).cpu()
                same = bool(torch.equal(layer(x).cpu(), cpu_layer._forward_int8(x.cpu())))
                bf16 = cuda_time_us(lambda: torch.matmul(x, w_bf16.T))
                kernel = cuda_time_us(lambda: tk.w2a8_matmul(xq, ones, layer.weight, layer.weight_scale, False,
                                                             torch.bfloat16))
                full = cuda_time_us(lambda: layer(x))  # BitLinear on CUDA: activation quantisation + kernel
                layer.int8_kernel = False  # BitLinear's float path: unpack to bf16 on every call, bf16 matmul
                unpack = cuda_time_us(lambda: layer(x))
                layer.int8_kernel = True
            rows.append(dict(shape=name, M=m, bf16_matmul_us=bf16, w2a8_kernel_us=kernel, w2a8_layer_us=full,
                             unpack_bf16_us=unpack, kernel_speedup=bf16 / kernel, layer_speedup=bf16 / full,
                             integer_sums_exact=exact, layer_equals_cpu_int8=same))
    return rows


def mixture_inputs(b, t, k, n, n_res, r, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, t, k, generator=gen).to(device, dtype)
    y = torch.randn(b, t, n, generator=gen).to(device, dtype)
    flat_A = (torch.randn(n_res * r, k, generator=gen) / k**0.5).to(device, dtype)
    flat_B = (torch.randn(n_res * r, n, generator=gen) / r**0.5).to(device, dtype)
    active = torch.arange(n_res, device=device)
    weights = torch.zeros(b, n_res)
    for i in range(b):  # sequence i mixes adapters i, i+1, i+2 (mod n_res)
        weights[i, [(i + j) % n_res for j in range(3)]] = torch.tensor([0.5, 0.3, 0.2])
    g_mix = (torch.rand(b, n, generator=gen) + 0.5).to(device)
    return x, y, flat_A, flat_B, r, active, weights.to(device), g_mix


def bench_dora_mixture_cuda(t_prefill: int, dev="cuda", k=DIM, n=HIDDEN) -> list[dict]:
    rows = []
    for t in (1, t_prefill):
        args = mixture_inputs(8, t, k, n, 8, 16, dev, torch.bfloat16)
        with torch.inference_mode():
            ref = tk.dora_mixture_reference(*args).float()
            got = tk.dora_mixture(*args).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            pt = cuda_time_us(lambda: tk.dora_mixture_reference(*args))
            tr = cuda_time_us(lambda: tk.dora_mixture(*args))
        rows.append(dict(case=f"8 seqs x {t} tokens, 8 adapters r=16, 3 per seq, {k}->{n}", pytorch_us=pt,
                         triton_us=tr, speedup=pt / tr, max_rel_err=err))
    return rows


def interpreter_check() -> dict:
    """The kernels in Triton's interpreter on CPU tensors against the PyTorch paths (small shapes)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are wrapped (lazily, per mode)
    try:
        start = time.perf_counter()
        out = {}
        for divide in (False, True):
            layer, _ = random_layer(300, 132, "cpu", divide_scale=divide)
            x = torch.randn(2, 5, 300)
            with torch.inference_mode():
                same = torch.equal(tk.bitlinear_forward(layer, x), layer._forward_int8(x))
            out["w2a8 == BitLinear._forward_int8 (" + ("bitlinear" if divide else "autobitlinear") + ")"] = same
        args = mixture_inputs(4, 3, 130, 70, 5, 8, "cpu", torch.float32)
        ref = tk.dora_mixture_reference(*args)
        err = ((tk.dora_mixture(*args) - ref).abs().max() / ref.abs().max()).item()
        out["dora mixture max relative error vs PyTorch"] = err
        out["seconds"] = time.perf_counter() - start
        return out
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=512, help="rows (tokens) of the prefill matmul")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not tk._load():
        print("skipped: triton is not installed (pip install -r requirements-gpu.txt)")
        return
    import triton

    result = {"triton": triton.__version__, "torch": torch.__version__}
    if tk.available():
        result["device"] = torch.cuda.get_device_name()
        print(f"device: {result['device']}, triton {triton.__version__}, torch {torch.__version__}")
        result["w2a8"] = bench_w2a8_cuda(args.prefill)
        print(f"\nW2A8 ternary matmul vs bf16 torch.matmul (CUDA events, µs; speedup = bf16 time / ours)")
        print(f"{'shape':<20} {'M':>5} {'bf16':>9} {'W2A8 kern':>10} {'W2A8 layer':>11} {'unpack+bf16':>12} "
              f"{'kern x':>7} {'layer x':>8} exact  ==cpu")
        for r in result["w2a8"]:
            print(f"{r['shape']:<20} {r['M']:>5} {r['bf16_matmul_us']:>9.1f} {r['w2a8_kernel_us']:>10.1f} "
                  f"{r['w2a8_layer_us']:>11.1f} {r['unpack_bf16_us']:>12.1f} {r['kernel_speedup']:>7.2f} "
                  f"{r['layer_speedup']:>8.2f} {r['integer_sums_exact']!s:>5}  {r['layer_equals_cpu_int8']}")
        result["dora"] = bench_dora_mixture_cuda(64)
        print("\nDoRA mixture: Triton shrink/expand vs PyTorch two matmuls (µs)")
        for r in result["dora"]:
            print(f"{r['case']:<60} pytorch {r['pytorch_us']:8.1f}  triton {r['triton_us']:8.1f}  "
                  f"x{r['speedup']:.2f}  max rel err {r['max_rel_err']:.1e}")
    else:
        result["cuda"] = "skipped: no CUDA device"
        print("CUDA benchmark skipped: no CUDA device (Triton W2A8 ÷ bf16 matmul needs a GPU)")
    start = time.perf_counter()
    result["compile_sm90"] = tk.compile_for(90, torch.bfloat16)
    result["compile_sm90_seconds"] = time.perf_counter() - start
    print(f"\nahead-of-time compile for sm_90 (H100), bf16: {len(result['compile_sm90'])} kernel configurations in "
          f"{result['compile_sm90_seconds']:.1f} s")
    for label, mma in result["compile_sm90"].items():
        print(f"  {label:<58} {', '.join(mma)}")
    result["interpreter"] = interpreter_check()
    print("\ninterpreter correctness (TRITON_INTERPRET=1, CPU tensors):")
    for key, value in result["interpreter"].items():
        print(f"  {key}: {value:.2e}" if isinstance(value, float) and key != "seconds" else f"  {key}: {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
