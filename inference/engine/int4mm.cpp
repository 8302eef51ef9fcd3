// r3mes::int4_mm: x [M, K] bfloat16 times int4 weight-only W^T -> [M, N] bfloat16 (N = 16 w.size(0)),
// with AVX512-BF16 (VDPBF16PS: 32 products per instruction); r3mes::int4_mm_lowrank: the same
// product with a DoRA group's low-rank paths fused in (below). Built and loaded by
// inference/engine/int4mm.py, which says when they are used.
//
// Why our own: PyTorch's CPU int4 kernel dequantises to float32 and multiplies with FMAs, so from
// four rows on it is compute-bound (8 rows cost 3x one); a batch's decode step spent ~7 of its
// ~12 ms there. Here the weights stay small integers, exact in bfloat16, and each dequantised
// vector serves every row:
//
//   y[m, n] = sum_g s[g, n] * sum_{k in g} (q - 8) x[m, k] + z[g, n] * sum_{k in g} x[m, k]
//
// with the (q - 8) read as bf16(128 + q) - 136: the bit pattern of 128 + q is 0x4300 | q, one
// ternary-logic instruction from the packed nibbles. Products are exact; sums are float32.
//
// Layout of `w` (uint8 [N/16, K/32, 320]): per block of 16 outputs and group of 32 inputs,
// 256 bytes of weights then 16 scales and 16 zeros (bfloat16). The weights are 4 chunks of 64
// bytes; chunk c holds input pairs p = 4c..4c+3 of the group, and its 16-bit lane j (j = 2i + e)
// holds q[n_i, k = 2p + e] in bits 4(p - 4c) .. 4(p - 4c) + 3.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockBytes = 320;

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Per row and group of 32 inputs: their sum (the zero points' and the 136 offset's share).
void group_sums(const uint16_t* x, int64_t M, int64_t K, float* sx) {
  const int64_t groups = K / kGroup;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* p = x + m * K + g * kGroup;
      sx[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(load_bf16(p), load_bf16(p + 16)));
    }
}

// One block of 16 outputs for ROWS rows of x (ROWS <= 8). ACC accumulators per row keep
// VDPBF16PS's latency hidden when there are few rows.
template <int ROWS, int ACC>
inline void block(const uint8_t* w, const uint16_t* x, int64_t ldx, const float* sx, int64_t groups,
                  uint16_t* y, int64_t ldy) {
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  const __m512i bias = _mm512_set1_epi16(0x4300);
  const __m512 minus136 = _mm512_set1_ps(-136.0f);
  __m512 out[ROWS];
  for (int m = 0; m < ROWS; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, w += kBlockBytes) {
    __m512 acc[ROWS][ACC];
    for (int m = 0; m < ROWS; ++m)
      for (int a = 0; a < ACC; ++a) acc[m][a] = _mm512_setzero_ps();
    const uint16_t* xg = x + g * kGroup;
    for (int c = 0; c < 4; ++c) {
      const __m512i b = _mm512_loadu_si512((const void*)(w + 64 * c));
      for (int t = 0; t < 4; ++t) {
        const __m512i s = t == 0 ? b : _mm512_srli_epi16(b, 4 * t);
        // (s & 0x000F) | 0x4300: bf16(128 + q)
        const __m512bh v = (__m512bh)_mm512_ternarylogic_epi32(s, nibble, bias, 0xEA);
        const int64_t k = 8 * c + 2 * t;
        for (int m = 0; m < ROWS; ++m) {
          int32_t pair;  // x[m, k], x[m, k + 1]: one 32-bit lane to broadcast
          std::memcpy(&pair, xg + m * ldx + k, sizeof pair);
          __m512& a = acc[m][(4 * c + t) % ACC];
          a = _mm512_dpbf16_ps(a, v, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
    }
    const __m512 scale = load_bf16((const uint16_t*)(w + 256));
    const __m512 zero = load_bf16((const uint16_t*)(w + 288));
    const __m512 shift = _mm512_fmadd_ps(minus136, scale, zero);  // z - 136 s
    for (int m = 0; m < ROWS; ++m) {
      __m512 a = acc[m][0];
      for (int i = 1; i < ACC; ++i) a = _mm512_add_ps(a, acc[m][i]);
      out[m] = _mm512_fmadd_ps(scale, a, out[m]);
      out[m] = _mm512_fmadd_ps(_mm512_set1_ps(sx[m * groups + g]), shift, out[m]);
    }
  }
  for (int m = 0; m < ROWS; ++m)
    _mm256_storeu_si256((__m256i*)(y + m * ldy), (__m256i)_mm512_cvtneps_pbh(out[m]));
}

template <int ROWS>
inline void rows_block(const uint8_t* w, const uint16_t* x, int64_t ldx, const float* sx, int64_t groups,
                       uint16_t* y, int64_t ldy) {
  if constexpr (ROWS == 1) {
    block<1, 4>(w, x, ldx, sx, groups, y, ldy);
  } else if constexpr (ROWS <= 3) {
    block<ROWS, 2>(w, x, ldx, sx, groups, y, ldy);
  } else {
    block<ROWS, 1>(w, x, ldx, sx, groups, y, ldy);
  }
}

void dispatch(int rows, const uint8_t* w, const uint16_t* x, int64_t ldx, const float* sx, int64_t groups,
              uint16_t* y, int64_t ldy) {
  switch (rows) {
    case 1: rows_block<1>(w, x, ldx, sx, groups, y, ldy); break;
    case 2: rows_block<2>(w, x, ldx, sx, groups, y, ldy); break;
    case 3: rows_block<3>(w, x, ldx, sx, groups, y, ldy); break;
    case 4: rows_block<4>(w, x, ldx, sx, groups, y, ldy); break;
    case 5: rows_block<5>(w, x, ldx, sx, groups, y, ldy); break;
    case 6: rows_block<6>(w, x, ldx, sx, groups, y, ldy); break;
    case 7: rows_block<7>(w, x, ldx, sx, groups, y, ldy); break;
    default: rows_block<8>(w, x, ldx, sx, groups, y, ldy); break;
  }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_mm: x must be a 2-d bfloat16 tensor");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == kBlockBytes && w.is_contiguous(),
              "int4_mm: w must be uint8 [N/16, K/32, 320] (inference/engine/int4mm.py pack_int4)");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), groups = w.size(1);
  TORCH_CHECK(K == groups * kGroup, "int4_mm: x has ", K, " inputs, the weight ", groups * kGroup);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, blocks * 16}, x.options());
  const auto* xp = (const uint16_t*)xc.data_ptr<at::BFloat16>();
  std::vector<float> sx(M * groups);
  group_sums(xp, M, K, sx.data());
  const float* sp = sx.data();
  auto* yp = (uint16_t*)y.data_ptr<at::BFloat16>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* wb = wp + nb * groups * kBlockBytes;
      for (int64_t m = 0; m < M; m += 8) {
        const int rows = (int)std::min<int64_t>(8, M - m);
        dispatch(rows, wb, xp + m * K, K, sp + m * groups, groups, yp + m * blocks * 16 + nb * 16, blocks * 16);
      }
    }
  });
  return y;
}

// x float32 [groups * 32] -> bfloat16, and the sum of each group of 32 (of the rounded values).
inline void to_bf16_with_group_sums(const float* x, int64_t n_groups, uint16_t* xb, float* sx) {
  for (int64_t q = 0; q < n_groups; ++q) {
    const __m256bh lo = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + q * kGroup));
    const __m256bh hi = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + q * kGroup + 16));
    _mm256_storeu_si256((__m256i*)(xb + q * kGroup), (__m256i)lo);
    _mm256_storeu_si256((__m256i*)(xb + q * kGroup + 16), (__m256i)hi);
    sx[q] = _mm512_reduce_add_ps(_mm512_add_ps(load_bf16(xb + q * kGroup), load_bf16(xb + q * kGroup + 16)));
  }
}

// The shrink: h [M, R] = (A [R, K] x^T) * rw (rw: the rows' mixture weights, or null).
inline void shrink(const uint16_t* A, int64_t K, int64_t R, const float* x, int64_t M, const float* rw, int64_t ldr,
                   float* h) {
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t* a = A + r * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {  // K is whole groups of 32
        acc0 = _mm512_fmadd_ps(load_bf16(a + k), _mm512_loadu_ps(xm + k), acc0);
        acc1 = _mm512_fmadd_ps(load_bf16(a + k + 16), _mm512_loadu_ps(xm + k + 16), acc1);
      }
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      h[m * R + r] = rw ? sum * rw[m * ldr + r] : sum;
    }
  }
}

// Outputs n0..n0+15 (half `half` of block u of 32) of row m: g * y + the expand of its projection's
// share of h.
inline __m512 add_expand(__m512 y, int64_t u, int half, int64_t m, const float* h, int64_t R, int64_t W, int64_t P,
                         const int64_t* starts, const uint16_t* B, const float* g, int64_t ldg, int64_t n0) {
  int64_t p = P - 1;
  while (starts[p] > u * 32) --p;
  const float* hm = h + m * R + p * W;
  const uint16_t* b = B + u * W * 32 + half * 16;
  __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= W; j += 2) {
    d0 = _mm512_fmadd_ps(_mm512_set1_ps(hm[j]), load_bf16(b + j * 32), d0);
    d1 = _mm512_fmadd_ps(_mm512_set1_ps(hm[j + 1]), load_bf16(b + j * 32 + 32), d1);
  }
  if (j < W) d0 = _mm512_fmadd_ps(_mm512_set1_ps(hm[j]), load_bf16(b + j * 32), d0);
  return _mm512_fmadd_ps(_mm512_loadu_ps(g + m * ldg + n0), y, _mm512_add_ps(d0, d1));
}

// One DoRA group of a compiled decode step fused with its backbone product (dora.lowrank_product):
//   out = g * bf16(x W^T) + B (h),  h = (A x) * rw
// x float32 [M, K]. The factors are read in place from the step's packed tensors
// (dora.pack_lowrank), so that the call makes no views: F bfloat16 [L, W, n], where from element
// `a_at` lie the group's A [P*W, K] (its P projections' shrinks, W rows each), then its B
// [N/32, W, 32] (their expands, blocks of 32 outputs, projection after projection: `sizes`);
// G float32 [L, 1, S] (a lone sequence) or [L, M, 1, S] (a batch, one row each), the group's g
// from element `g_at` of row 0; for a batch Wt float32 [M, sum P, W], its rows' mixture weights
// from element `w_at` of each row (w_at < 0: a lone sequence, no rows' weights; Wt is not read).
// `size0..2`: the output widths of the group's 1-3 projections, 0 for none. Float32 sums, as
// dora.add_lowrank. In one parallel region, thread 0 shrinks while the others start on the
// product (below); the expand is added to each block of outputs once h is there.
at::Tensor int4_mm_lowrank(const at::Tensor& x, const at::Tensor& w, const at::Tensor& F, int64_t a_at,
                           const at::Tensor& G, int64_t g_at, const at::Tensor& Wt, int64_t w_at, int64_t size0,
                           int64_t size1, int64_t size2) {
  TORCH_CHECK(size0 > 0 && size1 >= 0 && size2 >= 0 && (size1 > 0 || size2 == 0),
              "int4_mm_lowrank: sizes must be 1-3 positive output widths, then zeros");
  const int64_t sizes[3] = {size0, size1, size2};
  const int64_t P = size1 == 0 ? 1 : size2 == 0 ? 2 : 3;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int4_mm_lowrank: x must be 2-d float32");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == kBlockBytes && w.is_contiguous(),
              "int4_mm_lowrank: w must be uint8 [N/16, K/32, 320]");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), groups = w.size(1), N = blocks * 16;
  TORCH_CHECK(K == groups * kGroup, "int4_mm_lowrank: x has ", K, " inputs, the weight ", groups * kGroup);
  TORCH_CHECK(F.dim() == 3 && F.scalar_type() == at::kBFloat16 && F.is_contiguous(),
              "int4_mm_lowrank: F must be contiguous bfloat16 [L, W, n]");
  const int64_t W = F.size(1), R = P * W;
  TORCH_CHECK(a_at >= 0 && a_at + R * K + N * W <= F.numel(), "int4_mm_lowrank: the factors overrun F");
  const bool batch = G.dim() == 4;
  TORCH_CHECK((G.dim() == 3 || (batch && G.size(1) == M)) && G.scalar_type() == at::kFloat && G.is_contiguous(),
              "int4_mm_lowrank: G must be contiguous float32 [L, 1, S] or [L, M, 1, S]");
  const int64_t ldg = batch ? G.size(-1) : 0;
  TORCH_CHECK(g_at >= 0 && g_at + ldg * (M - 1) + N <= G.numel(), "int4_mm_lowrank: g overruns G");
  const bool weighted = w_at >= 0;
  int64_t ldr = 0;
  if (weighted) {
    TORCH_CHECK(Wt.dim() == 3 && Wt.size(0) == M && Wt.size(2) == W && Wt.scalar_type() == at::kFloat &&
                Wt.is_contiguous(), "int4_mm_lowrank: Wt must be contiguous float32 [M, sum P, W]");
    ldr = Wt.size(1) * W;
    TORCH_CHECK(w_at >= 0 && w_at + R <= ldr, "int4_mm_lowrank: the rows' weights overrun Wt");
  }
  int64_t starts[3], total = 0;
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(sizes[p] > 0 && sizes[p] % 32 == 0, "int4_mm_lowrank: sizes must be multiples of 32");
    starts[p] = total;
    total += sizes[p];
  }
  TORCH_CHECK(total == N, "int4_mm_lowrank: sizes sum to ", total, ", the weight has ", N, " outputs");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  // The shrink's output, scratch reused call after call.
  thread_local std::vector<float> hbuf;
  hbuf.resize(M * R);
  const auto* ap = (const uint16_t*)F.data_ptr<at::BFloat16>() + a_at;
  const auto* bp = ap + R * K;
  const float* gp = G.data_ptr<float>() + g_at;
  const float* rp = weighted ? Wt.data_ptr<float>() + w_at : nullptr;
  float* hp = hbuf.data();
  float* op = out.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t units = N / 32;
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units));
  std::atomic<int> h_ready{0};
  // Thread 0 shrinks (h = A x) while the others start on the backbone product, so nobody waits at
  // a barrier; it takes fewer blocks of 32 outputs to make up for the factor bytes it reads.
  const int64_t unit_bytes = 2 * groups * kBlockBytes + W * 64, a_bytes = R * K * 2;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t first = nt == 1 ? units
        : std::clamp<int64_t>(((units * unit_bytes + a_bytes) / nt - a_bytes) / unit_bytes, 0, units);
    if (tid == 0) {
      shrink(ap, K, R, xp, M, rp, ldr, hp);
      h_ready.store(1, std::memory_order_release);
    }
    // Each thread its own x in bfloat16 and group sums (M * K values: cheaper than a barrier).
    thread_local std::vector<uint16_t> xb;
    thread_local std::vector<float> sx;
    thread_local std::vector<int64_t> pending;  // blocks whose outputs wait for h
    xb.resize(M * K);
    sx.resize(M * groups);
    pending.clear();
    to_bf16_with_group_sums(xp, M * groups, xb.data(), sx.data());
    const int64_t begin = tid == 0 ? 0 : first + (units - first) * (tid - 1) / (nt - 1);
    const int64_t end = tid == 0 ? first : first + (units - first) * tid / (nt - 1);
    alignas(64) uint16_t tmp[8 * 16];
    for (int64_t u = begin; u < end; ++u) {
      const bool ready = h_ready.load(std::memory_order_acquire);
      for (int half = 0; half < 2; ++half) {
        const int64_t n0 = u * 32 + half * 16;
        const uint8_t* wb = wp + (n0 / 16) * groups * kBlockBytes;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const int rows = (int)std::min<int64_t>(8, M - m0);
          dispatch(rows, wb, xb.data() + m0 * K, K, sx.data() + m0 * groups, groups, tmp, 16);
          for (int i = 0; i < rows; ++i) {
            const int64_t m = m0 + i;
            const __m512 y = load_bf16(tmp + i * 16);
            if (ready)
              _mm512_storeu_ps(op + m * N + n0, add_expand(y, u, half, m, hp, R, W, P, starts, bp, gp, ldg, n0));
            else
              _mm512_storeu_ps(op + m * N + n0, y);
          }
        }
      }
      if (!ready) pending.push_back(u);
    }
    if (!pending.empty()) {
      while (!h_ready.load(std::memory_order_acquire)) _mm_pause();
      for (int64_t u : pending)
        for (int half = 0; half < 2; ++half)
          for (int64_t m = 0; m < M; ++m) {
            const int64_t n0 = u * 32 + half * 16;
            const __m512 y = _mm512_loadu_ps(op + m * N + n0);
            _mm512_storeu_ps(op + m * N + n0, add_expand(y, u, half, m, hp, R, W, P, starts, bp, gp, ldg, n0));
          }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(r3mes, m) {
  m.def("int4_mm(Tensor x, Tensor w) -> Tensor");
  m.def("int4_mm_lowrank(Tensor x, Tensor w, Tensor F, SymInt a_at, Tensor G, SymInt g_at, Tensor Wt, SymInt w_at, "
        "int size0, int size1, int size2) -> Tensor");
}

TORCH_LIBRARY_IMPL(r3mes, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int4_mm_lowrank", &int4_mm_lowrank);
}
