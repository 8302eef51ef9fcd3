/* A model of the memory reads of a three-expert DoRA mixture in one decode step of SmolLM2-135M
 * (30 layers, r=8 x 3 = width 24, bfloat16 factors: 14.6 MB a token), on one thread, with the
 * int4 backbone's ~84 MB read in between as the real step does (so the factors come from DRAM).
 * It times only the factor reads, two layouts:
 *   0: every factor its own region stacked over layers (A_qkv, B_q, B_k, B_v, A_o, B_o, A_gu, B_g,
 *      B_u, A_d, B_d: eleven streams a layer, how dora.decode_lowrank laid them out until eb2a2aa);
 *   1: one contiguous buffer per layer in the order the step reads it (one stream a layer).
 * The floor of what the mixture costs a token when its loops run on one thread.
 *
 *     gcc -O2 -mavx512f -o /tmp/factor_reads benchmarks/factor_reads.c && /tmp/factor_reads
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static float read_all(const char *p, size_t n) {  /* n: a multiple of 128 */
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 128) {
        a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_loadu_si512(p + i)));
        b = _mm512_add_ps(b, _mm512_castsi512_ps(_mm512_loadu_si512(p + i + 64)));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a, b));
}

int main(void) {
    enum { L = 30, STREAMS = 11 };
    const size_t bytes[STREAMS] = {72 * 576 * 2, 576 * 24 * 2, 192 * 24 * 2, 192 * 24 * 2, 24 * 576 * 2, 576 * 24 * 2,
                                   48 * 576 * 2, 1536 * 24 * 2, 1536 * 24 * 2, 24 * 1536 * 2, 576 * 24 * 2};
    const int group_start[5] = {0, 4, 6, 9, 11};  /* q|k|v, o, gate|up, down */
    /* int4 backbone bytes (weights + scales, ~5 bits a weight) read before each group's factors */
    const size_t backbone[4] = {960 * 576 * 5 / 8, 576 * 576 * 5 / 8, 3072 * 576 * 5 / 8, 1536 * 576 * 5 / 8};
    size_t per_layer = 0;
    for (int s = 0; s < STREAMS; s++) per_layer += bytes[s];
    size_t back_bytes = (size_t)84 << 20;
    char *back = aligned_alloc(4096, back_bytes), *region[STREAMS], *layers = aligned_alloc(4096, per_layer * L);
    memset(back, 1, back_bytes);
    memset(layers, 1, per_layer * L);
    for (int s = 0; s < STREAMS; s++) { region[s] = aligned_alloc(4096, bytes[s] * L); memset(region[s], 1, bytes[s] * L); }
    float sink = 0;
    for (int rep = 0; rep < 8; rep++) {
        for (int layout = 0; layout < 2; layout++) {
            double factors = 0;
            size_t at = 0;
            for (int l = 0; l < L; l++) {
                size_t off = 0;
                for (int g = 0; g < 4; g++) {
                    size_t n = backbone[g] & ~(size_t)127;
                    if (at + n > back_bytes) at = 0;
                    sink += read_all(back + at, n);
                    at += n;
                    double t = now();
                    for (int s = group_start[g]; s < group_start[g + 1]; s++) {
                        const char *p = layout == 0 ? region[s] + bytes[s] * l : layers + per_layer * l + off;
                        sink += read_all(p, bytes[s] & ~(size_t)127);
                        off += bytes[s];
                    }
                    factors += now() - t;
                }
            }
            printf("layout %d (%s): factors %.3f ms a token, %.1f GB/s\n", layout,
                   layout == 0 ? "11 streams a layer" : "1 stream a layer", factors * 1e3, per_layer * L / factors / 1e9);
        }
    }
    return sink == 12345.0f;
}
