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

/* The chunk of the base at a (at most CHUNK entries) widened into bf; returns
 * its length. The opening of every combining kernel's chunk loop. */
static inline int64_t widen_base(const uint16_t *base, int64_t a, int64_t n, float *bf)
{
    int64_t m = n - a < CHUNK ? n - a : CHUNK;
    for (int64_t j = 0; j < m; j++)
        bf[j] = from_bf16(base[a + j]);
    return m;
}

/* A chunk's m float32 results into out16 (rounded to nearest even, as torch
 * narrows float32 to bf16) or out32; returns how many are NaN. */
static inline int64_t store(const float *acc, int64_t m, uint16_t *out16, float *out32)
{
    int64_t nan = 0;
    if (out16) {
        for (int64_t j = 0; j < m; j++) {
            uint32_t u = bits_of(acc[j]);
            nan += (u & 0x7FFFFFFFu) > 0x7F800000u;
            out16[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        }
    } else {
        for (int64_t j = 0; j < m; j++) {
            nan += (bits_of(acc[j]) & 0x7FFFFFFFu) > 0x7F800000u;
            out32[j] = acc[j];
        }
    }
    return nan;
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
        int64_t m = widen_base(base, a, n, bf);
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
        nan += store(acc, m, out16 ? out16 + a : NULL, out16 ? NULL : out32 + a);
    }
    for (int64_t k = 0; k < k_count; k++) {
        double total = 0.0;
        for (int64_t j = 0; j < CHUNK; j++)
            total += lanes[k * CHUNK + j];
        sq[k] = total;
    }
    return nan;
}

/* The key of τ = fl32(θ_k) − fl32(θ_0), made from the two 16-bit patterns:
 * the bits of |τ| (engine/keys.py). */
static inline uint32_t tau_key(uint16_t t, uint16_t b)
{
    return bits_of(from_bf16(t) - from_bf16(b)) & 0x7FFFFFFFu;
}

/* coarse buckets: keys.N_COARSE (a key's top 15 bits) */
#define N_COARSE 32768u
/* entries per stream in a chunk of coarse_side_raw */
#define COUNT_CHUNK 512
/* table slots past the coarse buckets that the zero keys are spread over */
#define ZERO_SLOTS 8

/* kernels.coarse_side_raw: the coarse counts of τ's keys (the first half of
 * the block into counts, the second into counts2: two independent streams of
 * increments), and the keys whose low 16 bits are not all zero set aside in
 * numba's order; -1 as soon as `side` (cap entries) is full.
 *
 * Chunk by chunk: the keys first (a loop that vectorises), then the
 * increments, then the keys set aside (a branchless compaction while `side`
 * has room for the whole chunk). Both tables have N_COARSE + ZERO_SLOTS
 * slots: a zero key (an entry that did not move, often a third of an
 * embedding) goes to one of the spare slots in turn, so that a run of them
 * is not one chain of increments to one counter; the caller adds them to
 * bucket 0. Faster than numba's one loop by a quarter to a third on the
 * attention and MLP matrices and by a tenth to a fifth on the embeddings. */
CLONES
int64_t tadmerge_coarse_side_raw(const uint16_t *base, const uint16_t *task, int64_t n,
                                 int64_t *counts, int64_t *counts2, int32_t *side, int64_t cap)
{
    int64_t h = n / 2, ns = 0;
    const uint16_t *b1 = base, *b2 = base + h, *t1 = task, *t2 = task + h;
    uint32_t k1[COUNT_CHUNK], k2[COUNT_CHUNK], i1[COUNT_CHUNK], i2[COUNT_CHUNK];
    for (int64_t a = 0; a < h; a += COUNT_CHUNK) {
        int64_t m = h - a < COUNT_CHUNK ? h - a : COUNT_CHUNK;
        int32_t low = 0;
        for (int64_t j = 0; j < m; j++) {
            uint32_t spare = N_COARSE + ((uint32_t)j & (ZERO_SLOTS - 1));
            k1[j] = tau_key(t1[a + j], b1[a + j]);
            k2[j] = tau_key(t2[a + j], b2[a + j]);
            i1[j] = k1[j] ? k1[j] >> 16 : spare;
            i2[j] = k2[j] ? k2[j] >> 16 : spare;
            low += ((k1[j] | k2[j]) & 0xFFFFu) != 0;
        }
        for (int64_t j = 0; j < m; j++) {
            counts[i1[j]] += 1;
            counts2[i2[j]] += 1;
        }
        if (!low)
            continue;
        if (ns + 2 * m <= cap) {
            for (int64_t j = 0; j < m; j++) {
                side[ns] = (int32_t)k1[j];
                ns += (k1[j] & 0xFFFFu) != 0;
                side[ns] = (int32_t)k2[j];
                ns += (k2[j] & 0xFFFFu) != 0;
            }
            continue;
        }
        for (int64_t j = 0; j < m; j++) {
            if (k1[j] & 0xFFFFu) {
                if (ns == cap)
                    return -1;
                side[ns++] = (int32_t)k1[j];
            }
            if (k2[j] & 0xFFFFu) {
                if (ns == cap)
                    return -1;
                side[ns++] = (int32_t)k2[j];
            }
        }
    }
    if (n % 2) {
        uint32_t k = tau_key(task[n - 1], base[n - 1]);
        counts[k >> 16] += 1;
        if (k & 0xFFFFu) {
            if (ns == cap)
                return -1;
            side[ns++] = (int32_t)k;
        }
    }
    return ns;
}

/* kernels.tie_end_raw: one past the index of the quota-th entry whose key is
 * `key` (n if there are fewer); blocks of 1024 are counted first, a loop that
 * vectorises, and only the block where the quota is reached is scanned. */
CLONES
int64_t tadmerge_tie_end_raw(const uint16_t *base, const uint16_t *task, int64_t n, int64_t key,
                             int64_t quota)
{
    const uint32_t k32 = (uint32_t)key;
    int64_t c = 0;
    for (int64_t a = 0; a < n; a += 1024) {
        int64_t m = n - a < 1024 ? n - a : 1024;
        int32_t here = 0;
        for (int64_t j = 0; j < m; j++)
            here += tau_key(task[a + j], base[a + j]) == k32;
        if (c + here >= quota) {
            for (int64_t j = 0; j < m; j++) {
                c += tau_key(task[a + j], base[a + j]) == k32;
                if (c == quota)
                    return a + j + 1;
            }
        }
        c += here;
    }
    return n;
}

/* kernels.cut_combine_raw: per entry, τ_k from the raw bits, t_k = τ_k·fl32(s_k)
 * kept or +0.0 as kernels.cut_pass decides (kept: key below the high cut and
 * not below the low one, ties at a cut key split by index at its tie end),
 * then Σ_k t_k·w_k in task order, ·λ + θ0 (task arithmetic) or / Σw + θ0
 * (averaging), rounded to bf16 into out16 or stored into out32. Cut keys of
 * 2^31 and more mean "all below". kept[k] += the entries kept. Returns how
 * many results are NaN. */
CLONES
int64_t tadmerge_cut_combine_raw(const uint16_t *base, const uint16_t *const *tasks,
                                 int64_t k_count, int64_t n, const int64_t *lo_key,
                                 const int64_t *lo_end, const int64_t *hi_key,
                                 const int64_t *hi_end, const float *scale, const float *w,
                                 float lam, float total_w, int average, uint16_t *out16,
                                 float *out32, int64_t *kept)
{
    float bf[CHUNK], acc[CHUNK];
    int64_t nan = 0;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t m = widen_base(base, a, n, bf);
        for (int64_t k = 0; k < k_count; k++) {
            const uint16_t *ts = tasks[k] + a;
            const int32_t lk = (int32_t)(lo_key[k] < 0x7FFFFFFF ? lo_key[k] : 0x7FFFFFFF);
            const int32_t hk = (int32_t)(hi_key[k] < 0x7FFFFFFF ? hi_key[k] : 0x7FFFFFFF);
            /* the tie ends as indices into this chunk, clamped to [-1, CHUNK + 1] */
            int64_t le64 = lo_end[k] - a, he64 = hi_end[k] - a;
            const int32_t le = (int32_t)(le64 < -1 ? -1 : le64 > CHUNK + 1 ? CHUNK + 1 : le64);
            const int32_t he = (int32_t)(he64 < -1 ? -1 : he64 > CHUNK + 1 ? CHUNK + 1 : he64);
            const float s = scale[k], wk = w[k];
            int32_t cnt = 0;
            for (int32_t j = 0; j < (int32_t)m; j++) {
                float t = from_bf16(ts[j]) - bf[j];
                int32_t kb = (int32_t)(bits_of(t) & 0x7FFFFFFFu);
                int32_t below_lo = (kb < lk) | ((kb == lk) & (j < le));
                int32_t below_hi = (kb < hk) | ((kb == hk) & (j < he));
                int32_t keep = below_hi & !below_lo;
                cnt += keep;
                uint32_t sb = bits_of(t * s) & (uint32_t)(-keep);
                float st;
                memcpy(&st, &sb, 4);
                acc[j] = k == 0 ? st * wk : acc[j] + st * wk;
            }
            kept[k] += cnt;
        }
        if (average) {
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] / total_w + bf[j];
        } else {
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] * lam + bf[j];
        }
        nan += store(acc, m, out16 ? out16 + a : NULL, out16 ? NULL : out32 + a);
    }
    return nan;
}
