"""Software prefetch in the compiled mixture graphs' loops (Engine.compile_decode).

Where the int4 products run on our kernel (int4mm.cpp, CPUs with AVX512-BF16), the mixture's
low-rank paths are fused into that kernel and the graphs have no such loops; these prefetches
serve the other modes (bfloat16, int8) and CPUs without AVX512-BF16, whose graphs keep
dora.add_lowrank's loops.

A mixture's low-rank factors come from DRAM on every decode step: the int4 backbone streams ~84
MB through the caches between two uses of a layer's factors (14.6 MB a token for three r=8
experts on SmolLM2). Inductor's loops read them on one core with the hardware prefetcher alone,
whose reach is short next to the compute in each loop. With a prefetch of the line PREFETCH_BYTES
ahead of every bfloat16 vector load (the factors are the graphs' bfloat16 streams), a mixture's
loops read at about the rate of a plain streaming read (benchmarks/RESULTS.md, twelfth session).

Inductor has no switch for this, so `factor_prefetch` wraps its C++ vector kernel's `load` while a
mixture graph is lowered: each contiguous bfloat16 load gets a `__builtin_prefetch` line beside it
(GCC and Clang, any CPU; a prefetch never faults, so reading past a tensor's end is harmless). A
graph pass that changes nothing carries the setting into Inductor's cache keys, so a graph cached
without prefetches is not reused for one with them, or the other way round. Should Inductor's
internals change (torch is pinned), the loads come out as before and a warning says so.
"""
import contextlib
import logging

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

log = logging.getLogger(__name__)

# How far ahead of each load the prefetched line is: 8 KB is 3-7 rows of A (576 or 1536 bfloat16
# wide) or 5 of B's blocks (W=24) ahead, and past a group's end it reaches the next factors the
# step reads. Measured against 2, 4 and 16 KB (benchmarks/RESULTS.md, twelfth session).
PREFETCH_BYTES = 8192


class PrefetchKey(CustomGraphPass):
    """Changes no graph: its uuid puts the prefetch (this file's text) in Inductor's cache keys."""

    def __call__(self, graph: torch.fx.graph.Graph) -> None:
        return None

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


@contextlib.contextmanager
def factor_prefetch():
    """While active, Inductor's C++ kernels prefetch ahead of their contiguous bfloat16 loads."""
    from torch._inductor import config as inductor_config
    from torch._inductor.codegen import cpp as cpp_codegen
    from torch._inductor.virtualized import V

    kernel = cpp_codegen.CppVecKernel
    original = kernel.load
    warned = []

    def load(self, name, index):
        var = original(self, name, index)
        try:
            if V.graph.get_dtype(name) == torch.bfloat16:
                index = self.rename_indexing(index)
                if self._try_get_const_stride(index, self.itervars[self.tiling_idx]) == 1:
                    address = f"{self.args.input(name)} + {cpp_codegen.cexpr_index(index)}"
                    prefetched = self.__dict__.setdefault("_prefetched", set())  # a load CSE hands back again
                    if address in prefetched:
                        return var
                    prefetched.add(address)
                    self.loads.writeline(
                        f"__builtin_prefetch(reinterpret_cast<const char*>({address}) + {PREFETCH_BYTES});")
        except Exception as exc:  # Inductor's internals moved: the kernel stays as Inductor wrote it
            if not warned:
                warned.append(True)
                log.warning("factor_prefetch: no prefetches (%s: %s)", type(exc).__name__, exc)
        return var

    kernel.load = load
    try:
        with inductor_config.patch({"post_grad_custom_post_pass": PrefetchKey()}):
            yield
    finally:
        kernel.load = original
