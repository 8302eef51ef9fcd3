"""factor_prefetch (inference/engine/prefetch.py): the C++ kernels Inductor writes under it prefetch
ahead of their contiguous bfloat16 loads and compute what they computed without; Inductor's
caches keep the two apart. (The engine's own mixture graphs, built under it, give the eager
tokens: test_compiled_decode.py.)"""
import torch
from torch._inductor.utils import run_and_get_code

from inference.engine.prefetch import PREFETCH_BYTES, factor_prefetch


def shrink(x, A):
    """A mixture's shrink as dora.add_lowrank writes it: bfloat16 factors, float32 sums."""
    return (x * A.float()).sum(-1)


def compiled_code(prefetch: bool, x, A):
    torch._dynamo.reset()
    with factor_prefetch() if prefetch else torch.no_grad():
        got, codes = run_and_get_code(torch.compile(shrink, dynamic=False), x, A)
    return got, "\n".join(codes)


def test_kernels_compiled_under_factor_prefetch_prefetch_their_bfloat16_loads_and_sum_the_same():
    x = torch.randn(96)
    A = torch.randn(16, 96).to(torch.bfloat16)
    # without first, so that a cache keyed without the prefetch would hand the same code back
    plain, plain_code = compiled_code(False, x, A)
    got, code = compiled_code(True, x, A)
    assert "__builtin_prefetch" not in plain_code
    assert f"__builtin_prefetch(reinterpret_cast<const char*>(in_ptr1 + " in code  # A, the bfloat16 input
    assert f") + {PREFETCH_BYTES});" in code
    assert "__builtin_prefetch(reinterpret_cast<const char*>(in_ptr0" not in code  # x is float32
    torch.testing.assert_close(got, plain)
    torch.testing.assert_close(got, shrink(x, A))
    again, again_code = compiled_code(False, x, A)  # and the cache does not hand the prefetching code back
    assert "__builtin_prefetch" not in again_code
    torch.testing.assert_close(again, plain)
