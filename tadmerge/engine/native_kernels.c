/* C kernels of tadmerge (engine/native.py compiles and loads this file).
 *
 * Plain C99 float and double arithmetic in the order of the numba kernels they
 * replace (engine/kernels.py), so the bytes and the report norms are the same.
 * The file must be compiled with -ffp-contract=off (GCC contracts a*b + c into
 * one FMA by default where the target has one) and without -ffast-math.
 */
#include <stdint.h>
#include <string.h>

/* entries per chunk: kernels.RAW_CHUNK (the report's float64 lanes are per
 * position in a chunk, so the two must agree) */
#define CHUNK 2048

/* x86-64 Linux: one body per instruction set, picked when the library loads,
 * so that a cached library is right on every x86-64 machine that shares it */
#if defined(__x86_64__) && defined(__linux__) && !defined(TADMERGE_NO_CLONES)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

static inline float from_bf16(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Task arithmetic (Σ_k fl32(w_k)·τ_k in task order, ·λ, + θ0) or averaging
 * (Σ_k fl32(w_k)·θ_k / Σw) of n bf16 entries (base, tasks[k]: bit patterns),
 * rounded to bf16 as torch rounds into out16, or stored into out32 (the
 * other one NULL): kernels.stream_raw. Σ τ_k² goes to sq[k], summed in float64
 * per position in a chunk (lanes: k_count × CHUNK doubles, zero on entry),
 * the lanes then added in order. Returns how many results are NaN (the caller
 * then merges the block in numpy). */
CLONES
int64_t tadmerge_stream_raw(const uint16_t *base, const uint16_t *const *tasks, int64_t k_count,
                            int64_t n, const float *w, float lam, float total_w, int average,
                            uint16_t *out16, float *out32, double *sq, double *lanes)
{
    float bf[CHUNK], acc[CHUNK];
    int64_t nan = 0;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t m = n - a < CHUNK ? n - a : CHUNK;
        const uint16_t *bs = base + a;
        for (int64_t j = 0; j < m; j++)
            bf[j] = from_bf16(bs[j]);
        for (int64_t k = 0; k < k_count; k++) {
            const uint16_t *ts = tasks[k] + a;
            const float wk = w[k];
            double *lane = lanes + k * CHUNK;
            /* one loop per (first task or not, averaging or not): no branch inside */
            if (average) { /* sums θ_k; τ_k for the report only */
                if (k == 0) {
                    for (int64_t j = 0; j < m; j++) {
                        float t = from_bf16(ts[j]);
                        double d = (double)(t - bf[j]);
                        lane[j] += d * d;
                        acc[j] = t * wk;
                    }
                } else {
                    for (int64_t j = 0; j < m; j++) {
                        float t = from_bf16(ts[j]);
                        double d = (double)(t - bf[j]);
                        lane[j] += d * d;
                        acc[j] = acc[j] + t * wk;
                    }
                }
            } else if (k == 0) {
                for (int64_t j = 0; j < m; j++) {
                    float t = from_bf16(ts[j]) - bf[j];
                    double d = (double)t;
                    lane[j] += d * d;
                    acc[j] = t * wk;
                }
            } else {
                for (int64_t j = 0; j < m; j++) {
                    float t = from_bf16(ts[j]) - bf[j];
                    double d = (double)t;
                    lane[j] += d * d;
                    acc[j] = acc[j] + t * wk;
                }
            }
        }
        if (average) {
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] / total_w;
        } else {
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] * lam + bf[j];
        }
        if (out16) { /* round to nearest even, as torch narrows float32 to bf16 */
            uint16_t *o = out16 + a;
            for (int64_t j = 0; j < m; j++) {
                uint32_t u = bits_of(acc[j]);
                nan += (u & 0x7FFFFFFFu) > 0x7F800000u;
                o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            }
        } else {
            float *o = out32 + a;
            for (int64_t j = 0; j < m; j++) {
                nan += (bits_of(acc[j]) & 0x7FFFFFFFu) > 0x7F800000u;
                o[j] = acc[j];
            }
        }
    }
    for (int64_t k = 0; k < k_count; k++) {
        double total = 0.0;
        for (int64_t j = 0; j < CHUNK; j++)
            total += lanes[k * CHUNK + j];
        sq[k] = total;
    }
    return nan;
}
