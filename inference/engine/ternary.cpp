// r3mes::ternary_mm: BitNet b1.58's product, int8 per-token activations times ternary weights
// packed 2 bits each, exact int32 sums, the scales applied once. Built and loaded by
// inference/engine/ternary.py, which says when it is used.
//
//   y[m, n] = (sum_k t[n, k] q[m, k]) * (scale[n] / xs[m])
//   q[m, k] = clamp(round(x[m, k] * xs[m]), -128, 127),  xs[m] = 127 / max(|x[m, :]|, 1e-5)
//
// (transformers' ActQuant and AutoBitLinear, in the same float operations: the quantised
// activations are bit for bit theirs). The weights are read as u = t + 1 in {0, 1, 2}, unsigned
// bytes that VPDPBUSD multiplies with the signed activations, four products a 32-bit lane and 64
// an instruction; sum_k t q = sum_k u q - sum_k q, the row's activation sum taken once.
//
// Layout of `w` (uint8 [N/16, K/16, 64]): per block of 16 outputs and group of 16 inputs, 64
// bytes; byte 4j + b holds output n = 16 block + j, and its bits 2c, 2c + 1 hold u at input
// k = 16 group + 4c + b. One 512-bit load, a shift and a mask give, for c = 0..3, the 16 outputs'
// four weights at inputs 4c..4c+3 in each 32-bit lane: one VPDPBUSD with those four activations
// broadcast. Two bits a weight, nothing else resident but one float scale per output.
//
// Two instruction sets, chosen when the op is first called: AVX512-VNNI, and AVX2 (VPMADDUBSW
// then VPMADDWD, the same layout read as two 256-bit halves). Both are exact.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;       // outputs per block
constexpr int64_t kGroup = 16;       // inputs per group
constexpr int64_t kGroupBytes = 64;  // bytes per (block, group)
constexpr int kMaxRows = 8;          // rows of x sharing one unpacked weight vector

// Row m of x -> int8 levels (padded with zeros to Kp), their sum and xs. Plain C++ on purpose: M * K values, against N * K weights, and the same float
// operations as PyTorch's (nearest-even rounding, float32 division), so the levels match its.
void quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q, int32_t* qsum, float* xs) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  // PyTorch computes 127 / a as 127 * (1 / a): so do we, for the same levels bit for bit.
  const float scale = 127.0f * (1.0f / std::max(amax, 1e-5f));
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(x[k] * scale);
    v = std::min(127.f, std::max(-128.f, v));
    q[k] = (int8_t)v;
    sum += (int32_t)q[k];
  }
  std::memset(q + K, 0, Kp - K);
  *qsum = sum;
  *xs = scale;
}

inline int32_t load_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Blocks of 16 outputs for ROWS rows: acc[m][j] = sum_k u[n_j, k] q[m, k] (the weights at
// `w`, and for BLOCKS = 2 the next block's at `w + wstride`, sharing the broadcasts of q).
// No shifts: the byte masked in place holds u << 2c, so the four fields multiply into four
// accumulators weighed 1, 4, 16, 64, combined once at the end (exact: a group adds at most
// 4 * 128 * 128 to a lane, so the int32 sums hold for K < 2^19). One AND and one VPDPBUSD a field:
// for one or two rows, where unpacking costs as much as multiplying.
template <int ROWS, int BLOCKS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void block_vnni(const uint8_t* w, int64_t wstride,
                                                                       const int8_t* q, int64_t ldq, int64_t groups,
                                                                       int32_t* out) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30),
                m3 = _mm512_set1_epi8((char)0xC0);
  __m512i a0[ROWS][BLOCKS], a1[ROWS][BLOCKS], a2[ROWS][BLOCKS], a3[ROWS][BLOCKS];
  for (int m = 0; m < ROWS; ++m)
    for (int b = 0; b < BLOCKS; ++b)
      a0[m][b] = a1[m][b] = a2[m][b] = a3[m][b] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g, w += kGroupBytes) {
    __m512i u0[BLOCKS], u1[BLOCKS], u2[BLOCKS], u3[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b) {
      _mm_prefetch((const char*)(w + b * wstride + 16 * kGroupBytes), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512((const void*)(w + b * wstride));
      u0[b] = _mm512_and_si512(v, m0);
      u1[b] = _mm512_and_si512(v, m1);
      u2[b] = _mm512_and_si512(v, m2);
      u3[b] = _mm512_and_si512(v, m3);
    }
    const int8_t* qg = q + g * kGroup;
    for (int m = 0; m < ROWS; ++m) {
      const int8_t* qm = qg + m * ldq;
      const __m512i x0 = _mm512_set1_epi32(load_quad(qm)), x1 = _mm512_set1_epi32(load_quad(qm + 4)),
                    x2 = _mm512_set1_epi32(load_quad(qm + 8)), x3 = _mm512_set1_epi32(load_quad(qm + 12));
      for (int b = 0; b < BLOCKS; ++b) {
        a0[m][b] = _mm512_dpbusd_epi32(a0[m][b], u0[b], x0);
        a1[m][b] = _mm512_dpbusd_epi32(a1[m][b], u1[b], x1);
        a2[m][b] = _mm512_dpbusd_epi32(a2[m][b], u2[b], x2);
        a3[m][b] = _mm512_dpbusd_epi32(a3[m][b], u3[b], x3);
      }
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int b = 0; b < BLOCKS; ++b) {
      // a0 + a1 / 4 + a2 / 16 + a3 / 64, each exactly divisible
      const __m512i s = _mm512_add_epi32(
          _mm512_add_epi32(a0[m][b], _mm512_srai_epi32(a1[m][b], 2)),
          _mm512_add_epi32(_mm512_srai_epi32(a2[m][b], 4), _mm512_srai_epi32(a3[m][b], 6)));
      _mm512_storeu_si512((void*)(out + (b * ROWS + m) * kBlock), s);
    }
}

// The same for 3-8 rows: each unpacked field (shift, mask) serves every row, one accumulator a row.
template <int ROWS, int BLOCKS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows_vnni(const uint8_t* w, int64_t wstride,
                                                                      const int8_t* q, int64_t ldq, int64_t groups,
                                                                      int32_t* out) {
  static_assert(BLOCKS == 1, "one block at a time");
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g, w += kGroupBytes) {
    const __m512i v = _mm512_loadu_si512((const void*)w);
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < 4; ++c) {
      const __m512i u = _mm512_and_si512(c == 0 ? v : _mm512_srli_epi16(v, 2 * c), mask);
      for (int m = 0; m < ROWS; ++m)
        acc[m] = _mm512_dpbusd_epi32(acc[m], u, _mm512_set1_epi32(load_quad(qg + m * ldq + 4 * c)));
    }
  }
  for (int m = 0; m < ROWS; ++m) _mm512_storeu_si512((void*)(out + m * kBlock), acc[m]);
}

template <int ROWS, int BLOCKS>
__attribute__((target("avx2"))) void block_avx2(const uint8_t* w, int64_t wstride, const int8_t* q, int64_t ldq,
                                                int64_t groups, int32_t* out) {
  static_assert(BLOCKS == 1, "one block at a time");
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[ROWS][2];
  for (int m = 0; m < ROWS; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g, w += kGroupBytes) {
    const __m256i b0 = _mm256_loadu_si256((const __m256i*)w);
    const __m256i b1 = _mm256_loadu_si256((const __m256i*)(w + 32));
    const int8_t* qg = q + g * kGroup;
    for (int c = 0; c < 4; ++c) {
      const __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(b0, 2 * c), mask);
      const __m256i u1 = _mm256_and_si256(_mm256_srli_epi16(b1, 2 * c), mask);
      for (int m = 0; m < ROWS; ++m) {
        const __m256i x = _mm256_set1_epi32(load_quad(qg + m * ldq + 4 * c));
        // u <= 2 and |q| <= 128: the pairs' int16 sums cannot saturate
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, x), ones));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, x), ones));
      }
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    _mm256_storeu_si256((__m256i*)(out + m * kBlock), acc[m][0]);
    _mm256_storeu_si256((__m256i*)(out + m * kBlock + 8), acc[m][1]);
  }
}

using BlockFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*);

// A set of kernels: one[r - 1] does one block for r rows; two[r - 1], where not null, two blocks.
struct Kernels {
  BlockFn one[kMaxRows];
  BlockFn two[kMaxRows];
};

const Kernels kVnni = {
    {&block_vnni<1, 1>, &block_vnni<2, 1>, &rows_vnni<3, 1>, &rows_vnni<4, 1>, &rows_vnni<5, 1>, &rows_vnni<6, 1>,
     &rows_vnni<7, 1>, &rows_vnni<8, 1>},
    {&block_vnni<1, 2>, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}};
const Kernels kAvx2 = {
    {&block_avx2<1, 1>, &block_avx2<2, 1>, &block_avx2<3, 1>, &block_avx2<4, 1>, &block_avx2<5, 1>,
     &block_avx2<6, 1>, &block_avx2<7, 1>, &block_avx2<8, 1>},
    {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr}};

// "avx512-vnni", "avx2" or "" (neither: the caller keeps PyTorch's product).
const char* isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    return "avx512-vnni";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "";
}

// The best this CPU runs, or the one named ("avx2" on an AVX512 machine: tests of both paths).
const Kernels* kernels(const std::string& name) {
  static const std::string best = isa();
  const std::string& want = name.empty() ? best : name;
  TORCH_CHECK(want == "avx2" ? __builtin_cpu_supports("avx2") : want == best,
              "ternary_mm: this CPU cannot run the '", want, "' kernel (best: '", best, "')");
  return want == "avx512-vnni" ? &kVnni : want == "avx2" ? &kAvx2 : nullptr;
}

std::string ternary_isa() { return isa(); }

at::Tensor ternary_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, c10::string_view isa_name) {
  const Kernels* fns = kernels(std::string(isa_name));
  TORCH_CHECK(fns != nullptr, "ternary_mm: this CPU has neither AVX512-VNNI nor AVX2");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "ternary_mm: x must be a 2-d float32 tensor");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == kGroupBytes && w.is_contiguous(),
              "ternary_mm: w must be contiguous uint8 [N/16, K/16, 64] (inference/engine/ternary.py pack)");
  const int64_t M = x.size(0), K = x.size(1), blocks = w.size(0), groups = w.size(1), N = blocks * kBlock;
  const int64_t Kp = groups * kGroup;
  TORCH_CHECK(K <= Kp && Kp - K < kGroup, "ternary_mm: x has ", K, " inputs, the weight ", Kp, " (padded)");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "ternary_mm: scale must be contiguous float32 [", N, "]");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  // Scratch reused call after call (this thread's: the op may run in several threads at once).
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<int32_t> qsum;
  thread_local std::vector<float> xs;
  qbuf.resize(M * Kp);
  qsum.resize(M);
  xs.resize(M);
  const float* xp = xc.data_ptr<float>();
  int8_t* qp = qbuf.data();
  int32_t* sp = qsum.data();
  float* xsp = xs.data();
  if (M >= 4) {
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) quantize_row(xp + m * K, K, Kp, qp + m * Kp, sp + m, xsp + m);
    });
  } else {
    for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, Kp, qp + m * Kp, sp + m, xsp + m);
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* scp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Pairs of blocks: a lone row reads two weight streams at once (twice the loads in flight).
  const int64_t pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t acc[2 * kMaxRows * kBlock];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t nb0 = 2 * pair, nbs = std::min<int64_t>(2, blocks - nb0);
      const uint8_t* wb = wp + nb0 * groups * kGroupBytes;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = (int)std::min<int64_t>(kMaxRows, M - m0);
        const int8_t* qm = qp + m0 * Kp;
        if (nbs == 2 && fns->two[rows - 1] != nullptr) {
          fns->two[rows - 1](wb, groups * kGroupBytes, qm, Kp, groups, acc);
        } else {
          for (int64_t b = 0; b < nbs; ++b)
            fns->one[rows - 1](wb + b * groups * kGroupBytes, 0, qm, Kp, groups, acc + b * rows * kBlock);
        }
        for (int64_t b = 0; b < nbs; ++b)
          for (int i = 0; i < rows; ++i) {
            const int64_t m = m0 + i, n0 = (nb0 + b) * kBlock;
            const int32_t* a = acc + (b * rows + i) * kBlock;
            float* ym = yp + m * N + n0;
            for (int j = 0; j < kBlock; ++j) ym[j] = (float)(a[j] - sp[m]) * (scp[n0 + j] / xsp[m]);
          }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(r3mes_ternary, m) {
  m.def("ternary_mm(Tensor x, Tensor w, Tensor scale, str isa=\"\") -> Tensor");
  m.def("isa() -> str", &ternary_isa);
}

TORCH_LIBRARY_IMPL(r3mes_ternary, CPU, m) { m.impl("ternary_mm", &ternary_mm); }
