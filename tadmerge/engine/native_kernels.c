/* The compiled CPU kernels of tadmerge (engine/native.py compiles and loads
 * this file; engine/kernels.py calls it).
 *
 * Each kernel computes what a torch function of the engine computes (named at
 * the kernel), with the same float32 operations in the same order, so the
 * output bytes are the same, and the same exact integers (histograms, exact
 * sums). Plain C99 float, double and integer arithmetic; the file must be
 * compiled with -ffp-contract=off (GCC contracts a*b + c into one FMA by
 * default where the target has one) and without -ffast-math.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* entries per chunk of the combining kernels: kernels.RAW_CHUNK and
 * native.CHUNK (stream's float64 lanes are per position in a chunk) */
#define CHUNK 2048
/* entries per chunk of the TIES and EMR kernels: their float buffers stay in L1 */
#define TCHUNK 1024
/* coarse buckets: keys.N_COARSE (a key's top 15 bits); fine bins: keys.N_FINE */
#define N_COARSE 32768u
#define N_FINE 65536
/* entries per stream in a chunk of coarse_side */
#define COUNT_CHUNK 512
/* table slots past the coarse buckets that the zero keys are spread over
 * (native.ZERO_SLOTS) */
#define ZERO_SLOTS 8
#define M31 0x7FFFFFFFu

/* GCC's -O3 "unroll and jam" fuses two tasks' passes of the loops below over
 * one chunk into one loop that it then does not vectorise (TIES ran 5x slower) */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-loop-unroll-and-jam")
#endif

/* x86-64 Linux: one body per instruction set, picked when the library loads,
 * so that a cached library is right on every x86-64 machine that shares it */
#if defined(__x86_64__) && defined(__linux__) && !defined(TADMERGE_NO_CLONES)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* helpers called with constant arguments (a dtype, a NULL pointer): inlined,
 * so that each caller's loops are specialised and branch-free */
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

/* the safetensors dtypes of streamed blocks (kernels.STREAM_DTYPES) */
enum { BF16 = 0, F16 = 1, F32 = 2, F64 = 3 };

INLINE uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

INLINE float float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE float from_bf16(uint16_t b)
{
    return float_of((uint32_t)b << 16);
}

/* float16 to float32, exact (subnormals renormalised by an exact subtraction) */
INLINE float from_f16(uint16_t h)
{
    uint32_t o = (uint32_t)(h & 0x7FFFu) << 13;
    uint32_t e = o & (0x7C00u << 13);
    o += (uint32_t)(127 - 15) << 23;
    if (e == (0x7C00u << 13)) { /* Inf, NaN */
        o += (uint32_t)(128 - 16) << 23;
    } else if (e == 0) { /* zero, subnormal */
        o += 1u << 23;
        o = bits_of(float_of(o) - float_of(113u << 23));
    }
    return float_of(o | (uint32_t)(h & 0x8000u) << 16);
}

/* float32 to float16 rounded to nearest even, as torch and numpy narrow it
 * (Inf past the largest; NaN is counted by the caller, which leaves such a
 * block to torch) */
INLINE uint16_t to_f16(float f)
{
    uint32_t u = bits_of(f), sign = u & 0x80000000u;
    uint32_t o;
    u ^= sign;
    if (u >= (uint32_t)(127 + 16) << 23) { /* Inf or NaN */
        o = u > (255u << 23) ? 0x7E00u : 0x7C00u;
    } else if (u < 113u << 23) { /* a float16 subnormal or zero: the FPU rounds */
        const uint32_t magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        o = bits_of(float_of(u) + float_of(magic)) - magic;
    } else {
        uint32_t odd = (u >> 13) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xFFFu + odd;
        o = u >> 13;
    }
    return (uint16_t)(o | sign >> 16);
}

/* float32 to bf16 rounded to nearest even, as torch narrows it */
INLINE uint16_t to_bf16(float f)
{
    uint32_t u = bits_of(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

INLINE int is_nan(float f)
{
    return (bits_of(f) & M31) > 0x7F800000u;
}

/* entry j of a block of dtype dt, as float32 (float64: rounded to nearest) */
INLINE float load(const void *p, const int dt, int64_t j)
{
    switch (dt) {
    case BF16:
        return from_bf16(((const uint16_t *)p)[j]);
    case F16:
        return from_f16(((const uint16_t *)p)[j]);
    case F32:
        return ((const float *)p)[j];
    default:
        return (float)((const double *)p)[j];
    }
}

static const int64_t SIZE[4] = {2, 2, 4, 8};

/* the block p of dtype dt from its entry a on */
INLINE const void *from(const void *p, int dt, int64_t a)
{
    return (const char *)p + a * SIZE[dt];
}

/* The chunk of a block at a (at most CHUNK entries) widened into bf; returns
 * its length. The opening of every combining kernel's chunk loop. */
INLINE void widen_as(const void *p, const int dt, int64_t m, float *bf)
{
    for (int64_t j = 0; j < m; j++)
        bf[j] = load(p, dt, j);
}

INLINE int64_t widen(const void *base, int dt, int64_t a, int64_t n, float *bf)
{
    int64_t m = n - a < CHUNK ? n - a : CHUNK;
    const void *p = from(base, dt, a);
    switch (dt) {
    case BF16:
        widen_as(p, BF16, m, bf);
        break;
    case F16:
        widen_as(p, F16, m, bf);
        break;
    case F32:
        widen_as(p, F32, m, bf);
        break;
    default:
        widen_as(p, F64, m, bf);
    }
    return m;
}

/* A chunk's m float32 results into out (dtype dt) from its entry a on, rounded
 * to nearest even as torch narrows; returns how many are NaN. */
INLINE int64_t store(const float *acc, int64_t m, void *out, int dt, int64_t a)
{
    int64_t nan = 0;
    switch (dt) {
    case BF16: {
        uint16_t *o = (uint16_t *)out + a;
        for (int64_t j = 0; j < m; j++) {
            nan += is_nan(acc[j]);
            o[j] = to_bf16(acc[j]);
        }
        break;
    }
    case F16: {
        uint16_t *o = (uint16_t *)out + a;
        for (int64_t j = 0; j < m; j++) {
            nan += is_nan(acc[j]);
            o[j] = to_f16(acc[j]);
        }
        break;
    }
    case F32: {
        float *o = (float *)out + a;
        for (int64_t j = 0; j < m; j++) {
            nan += is_nan(acc[j]);
            o[j] = acc[j];
        }
        break;
    }
    default: {
        double *o = (double *)out + a;
        for (int64_t j = 0; j < m; j++) {
            nan += is_nan(acc[j]);
            o[j] = (double)acc[j];
        }
    }
    }
    return nan;
}

/* ------------------------------------------------------------------------- */
/* task arithmetic and averaging without a sparsifier                        */
/* ------------------------------------------------------------------------- */

/* One task's chunk (ts, dtype dt: m entries) into acc, and Σ τ² into its lane:
 * one loop per (first task or not, averaging or not), no branch inside. */
INLINE void stream_task(const void *ts, const int dt, const float *bf, int64_t m, float wk,
                        int first, int average, double *lane, float *acc)
{
    if (average) { /* sums θ_k; τ_k for the report only */
        if (first) {
            for (int64_t j = 0; j < m; j++) {
                float t = load(ts, dt, j);
                double d = (double)(t - bf[j]);
                lane[j] += d * d;
                acc[j] = t * wk;
            }
        } else {
            for (int64_t j = 0; j < m; j++) {
                float t = load(ts, dt, j);
                double d = (double)(t - bf[j]);
                lane[j] += d * d;
                acc[j] = acc[j] + t * wk;
            }
        }
    } else if (first) {
        for (int64_t j = 0; j < m; j++) {
            float t = load(ts, dt, j) - bf[j];
            double d = (double)t;
            lane[j] += d * d;
            acc[j] = t * wk;
        }
    } else {
        for (int64_t j = 0; j < m; j++) {
            float t = load(ts, dt, j) - bf[j];
            double d = (double)t;
            lane[j] += d * d;
            acc[j] = acc[j] + t * wk;
        }
    }
}

/* Task arithmetic (Σ_k fl32(w_k)·τ_k in task order, ·λ, + θ0) or averaging
 * (Σ_k fl32(w_k)·θ_k / Σw) of n entries: combine.task_arithmetic and
 * combine.average (linear.merge_weights) of merge_block. Inputs in their own
 * dtypes (dts[0]: the base's, dts[1 + k]: task k's, codes BF16..F64), widened
 * to float32 as torch widens them; the result rounded to the output's dtype
 * as torch rounds. Σ τ_k² goes to sq[k], summed in float64 per position in a
 * chunk (lanes: k_count × CHUNK doubles, zero on entry), the lanes then added
 * in order. Returns how many results are NaN (the caller then merges the block
 * with torch). kernels.stream. */
CLONES
int64_t tadmerge_stream(const void *base, const void *const *tasks, const int32_t *dts,
                        int64_t k_count, int64_t n, const float *w, float lam, float total_w,
                        int average, void *out, int out_dt, double *sq, double *lanes)
{
    float bf[CHUNK], acc[CHUNK], tf[CHUNK];
    int64_t nan = 0;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t m = widen(base, dts[0], a, n, bf);
        for (int64_t k = 0; k < k_count; k++) {
            const int dt = dts[1 + k];
            const void *ts = from(tasks[k], dt, a);
            double *lane = lanes + k * CHUNK;
            /* bf16 and float32 read in the loop; float16 and float64 widened
             * first (a conversion that does not vectorise beside the rest) */
            if (dt == BF16) {
                stream_task(ts, BF16, bf, m, w[k], k == 0, average, lane, acc);
            } else if (dt == F32) {
                stream_task(ts, F32, bf, m, w[k], k == 0, average, lane, acc);
            } else {
                widen(tasks[k], dt, a, n, tf);
                stream_task(tf, F32, bf, m, w[k], k == 0, average, lane, acc);
            }
        }
        if (average) {
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] / total_w;
        } else {
            for (int64_t j = 0; j < m; j++)
                acc[j] = acc[j] * lam + bf[j];
        }
        nan += store(acc, m, out, out_dt, a);
    }
    for (int64_t k = 0; k < k_count; k++) {
        double total = 0.0;
        for (int64_t j = 0; j < CHUNK; j++)
            total += lanes[k * CHUNK + j];
        sq[k] = total;
    }
    return nan;
}

/* ------------------------------------------------------------------------- */
/* statistics: histograms of magnitude keys (engine/exact.py, histogram.py)  */
/* ------------------------------------------------------------------------- */

/* The magnitude key (keys.py: the bits of |x|) of entry i: of a float32 block
 * (its bits), or, bits NULL, of τ = fl32(task) − fl32(base) made from the two
 * bf16 patterns (engine/raw.py: τ never stored). */
INLINE uint32_t key_at(const uint32_t *bits, const uint16_t *base, const uint16_t *task, int64_t i)
{
    if (bits)
        return bits[i] & M31;
    return bits_of(from_bf16(task[i]) - from_bf16(base[i])) & M31;
}

/* Every counting kernel runs two independent streams (the two halves of the
 * input) into two tables: a value that repeats (the zeros of an untouched
 * row) otherwise makes every increment wait for the previous one to the same
 * counter. */

/* counts per coarse bucket (exact._coarse_stats_torch's first bincount) */
CLONES
void tadmerge_coarse_counts(const uint32_t *bits, int64_t n, int64_t *counts, int64_t *counts2)
{
    int64_t h = n / 2;
    for (int64_t i = 0; i < h; i++) {
        counts[(bits[i] & M31) >> 16] += 1;
        counts2[(bits[h + i] & M31) >> 16] += 1;
    }
    if (n % 2)
        counts[(bits[n - 1] & M31) >> 16] += 1;
}

/* acc[3b .. 3b+2] = (count, Σ L, Σ L²) of bucket b, L a key's low 16 bits:
 * exact._coarse_stats_torch's three bincounts, in int64 */
CLONES
void tadmerge_coarse_moments(const uint32_t *bits, int64_t n, int64_t *acc, int64_t *acc2)
{
    int64_t h = n / 2;
    for (int64_t i = 0; i < h; i++) {
        uint32_t k = bits[i] & M31, k2 = bits[h + i] & M31;
        int64_t *r = acc + 3 * (k >> 16), *r2 = acc2 + 3 * (k2 >> 16);
        int64_t low = k & 0xFFFFu, low2 = k2 & 0xFFFFu;
        r[0] += 1;
        r[1] += low;
        r[2] += low * low;
        r2[0] += 1;
        r2[1] += low2;
        r2[2] += low2 * low2;
    }
    if (n % 2) {
        uint32_t k = bits[n - 1] & M31;
        int64_t *r = acc + 3 * (k >> 16);
        int64_t low = k & 0xFFFFu;
        r[0] += 1;
        r[1] += low;
        r[2] += low * low;
    }
}

/* The coarse counts of the keys (the first half of the block into counts, the
 * second into counts2), and the keys whose low 16 bits are not all zero set
 * aside, the two streams' interleaved (entry i of the first half, then entry
 * i of the second); -1 as soon as `side` (cap entries) is full. These keys
 * alone carry the moments and the fine bins other than 0: on bf16 task
 * vectors ~1% of the entries (kernels.coarse_sparse).
 *
 * Chunk by chunk: the keys first (a loop that vectorises), then the
 * increments, then the keys set aside (a branchless compaction while `side`
 * has room for the whole chunk). Both tables have N_COARSE + ZERO_SLOTS
 * slots: a zero key (an entry that did not move, often a third of an
 * embedding) goes to one of the spare slots in turn, so that a run of them
 * is not one chain of increments to one counter; the caller adds them to
 * bucket 0. */
INLINE int64_t coarse_side(const uint32_t *bits, const uint16_t *base, const uint16_t *task,
                           int64_t n, int64_t *counts, int64_t *counts2, int32_t *side,
                           int64_t cap)
{
    int64_t h = n / 2, ns = 0;
    uint32_t k1[COUNT_CHUNK], k2[COUNT_CHUNK], i1[COUNT_CHUNK], i2[COUNT_CHUNK];
    for (int64_t a = 0; a < h; a += COUNT_CHUNK) {
        int64_t m = h - a < COUNT_CHUNK ? h - a : COUNT_CHUNK;
        int32_t low = 0;
        for (int64_t j = 0; j < m; j++) {
            uint32_t spare = N_COARSE + ((uint32_t)j & (ZERO_SLOTS - 1));
            k1[j] = key_at(bits, base, task, a + j);
            k2[j] = key_at(bits, base, task, h + a + j);
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
        uint32_t k = key_at(bits, base, task, n - 1);
        counts[k >> 16] += 1;
        if (k & 0xFFFFu) {
            if (ns == cap)
                return -1;
            side[ns++] = (int32_t)k;
        }
    }
    return ns;
}

/* coarse_side of a float32 block's keys (kernels.coarse_sparse) */
CLONES
int64_t tadmerge_coarse_side(const uint32_t *bits, int64_t n, int64_t *counts, int64_t *counts2,
                             int32_t *side, int64_t cap)
{
    return coarse_side(bits, NULL, NULL, n, counts, counts2, side, cap);
}

/* coarse_side of τ's keys, τ made from raw bf16 blocks (kernels.coarse_sparse_raw) */
CLONES
int64_t tadmerge_coarse_side_raw(const uint16_t *base, const uint16_t *task, int64_t n,
                                 int64_t *counts, int64_t *counts2, int32_t *side, int64_t cap)
{
    return coarse_side(NULL, base, task, n, counts, counts2, side, cap);
}

/* Fine histograms of the wanted coarse buckets (histogram.fine_histograms):
 * rows[lut[b] · N_FINE + L] += 1 for each key of bucket b (L: its low 16
 * bits); lut maps the unwanted buckets to a last row (no branch). rows and
 * rows2 (the two streams) may be one table. */
CLONES
void tadmerge_fine_rows(const uint32_t *bits, int64_t n, const int32_t *lut, int32_t *rows,
                        int32_t *rows2)
{
    int64_t h = n / 2;
    for (int64_t i = 0; i < h; i++) {
        uint32_t k = bits[i] & M31, k2 = bits[h + i] & M31;
        rows[(int64_t)lut[k >> 16] * N_FINE + (k & 0xFFFFu)] += 1;
        rows2[(int64_t)lut[k2 >> 16] * N_FINE + (k2 & 0xFFFFu)] += 1;
    }
    if (n % 2) {
        uint32_t k = bits[n - 1] & M31;
        rows[(int64_t)lut[k >> 16] * N_FINE + (k & 0xFFFFu)] += 1;
    }
}

/* One past the index of the quota-th entry whose key is `key` (n if there
 * are fewer): where a cut's ties at its key end in a block (quota > 0,
 * key >= 0; sparsify.ties_below). Blocks of 1024 are counted first, a loop
 * that vectorises, and only the block where the quota is reached is scanned. */
INLINE int64_t tie_end(const uint32_t *bits, const uint16_t *base, const uint16_t *task,
                       int64_t n, int64_t key, int64_t quota)
{
    const uint32_t k32 = (uint32_t)key;
    int64_t c = 0;
    for (int64_t a = 0; a < n; a += 1024) {
        int64_t m = n - a < 1024 ? n - a : 1024;
        int32_t here = 0;
        for (int64_t j = 0; j < m; j++)
            here += key_at(bits, base, task, a + j) == k32;
        if (c + here >= quota) {
            for (int64_t j = 0; j < m; j++) {
                c += key_at(bits, base, task, a + j) == k32;
                if (c == quota)
                    return a + j + 1;
            }
        }
        c += here;
    }
    return n;
}

CLONES
int64_t tadmerge_tie_end(const uint32_t *bits, int64_t n, int64_t key, int64_t quota)
{
    return tie_end(bits, NULL, NULL, n, key, quota);
}

CLONES
int64_t tadmerge_tie_end_raw(const uint16_t *base, const uint16_t *task, int64_t n, int64_t key,
                             int64_t quota)
{
    return tie_end(NULL, base, task, n, key, quota);
}

/* ------------------------------------------------------------------------- */
/* the apply phase                                                           */
/* ------------------------------------------------------------------------- */

/* A tie end (an index into the block) as an index into the chunk at a,
 * clamped to [-1, CHUNK + 1]: the same answer to j < end for j in the chunk */
INLINE int32_t chunk_end(int64_t end, int64_t a)
{
    int64_t e = end - a;
    return (int32_t)(e < -1 ? -1 : e > CHUNK + 1 ? CHUNK + 1 : e);
}

/* whether a key is below a cut (key ck, ties below it before index ce) */
INLINE uint32_t below(uint32_t k, uint32_t ck, int32_t j, int32_t ce)
{
    return (k < ck) | ((k == ck) & (j < ce));
}

INLINE int32_t cut_chunk(float *x, int32_t m, uint32_t lk, int32_t le, uint32_t hk, int32_t he,
                         float scale, const int rescale)
{
    int32_t cnt = 0;
    for (int32_t j = 0; j < m; j++) {
        uint32_t k = bits_of(x[j]) & M31;
        uint32_t keep = below(k, hk, j, he) & !below(k, lk, j, le);
        float v = rescale ? x[j] * scale : x[j];
        cnt += (int32_t)keep;
        x[j] = float_of(bits_of(v) & -keep);
    }
    return cnt;
}

/* A resolved selection applied to a float32 block in place, in flat order
 * (sparsify.BlockCuts.keep, apply_keep): an entry is kept when its key is below the high cut
 * and not below the low one, ties at a cut key being below it before the
 * index where the block's quota of them ends (tie_end); kept entries become
 * t·fl32(scale) (when rescale), the others +0.0. Cut keys below 0 mean "all
 * below" (2^31 here, above every key). Branch-free where the data decides
 * (keep or drop is a coin flip at TADrop's rates), chunk by chunk so that
 * every lane is 32 bits wide. Returns the kept count. kernels.cut_block. */
CLONES
int64_t tadmerge_cut_pass(float *t, int64_t n, int64_t lo_key, int64_t lo_end, int64_t hi_key,
                          int64_t hi_end, float scale, int rescale)
{
    const uint32_t lk = lo_key < 0 ? 0x80000000u : (uint32_t)lo_key;
    const uint32_t hk = hi_key < 0 ? 0x80000000u : (uint32_t)hi_key;
    int64_t kept = 0;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int32_t m = (int32_t)(n - a < CHUNK ? n - a : CHUNK);
        int32_t le = chunk_end(lo_end, a), he = chunk_end(hi_end, a);
        if (rescale)
            kept += cut_chunk(t + a, m, lk, le, hk, he, scale, 1);
        else
            kept += cut_chunk(t + a, m, lk, le, hk, he, scale, 0);
    }
    return kept;
}

/* Per entry, τ_k from the raw bf16 bits, t_k = τ_k·fl32(s_k) kept or +0.0 as
 * cut_pass decides, then Σ_k t_k·w_k in task order, ·λ + θ0 (task
 * arithmetic) or / Σw + θ0 (averaging), rounded to bf16 into out16 or stored
 * into out32: merge_block's bytes for a magnitude selection with task
 * arithmetic or averaging (engine/raw.py). Cut keys of 2^31 and more mean
 * "all below" (0x7FFFFFFF here, above every finite key). kept[k] += the
 * entries kept. Returns how many results are NaN. kernels.cut_combine_raw. */
CLONES
int64_t tadmerge_cut_combine_raw(const uint16_t *base, const uint16_t *const *tasks,
                                 int64_t k_count, int64_t n, const int64_t *lo_key,
                                 const int64_t *lo_end, const int64_t *hi_key,
                                 const int64_t *hi_end, const float *scale, const float *w,
                                 float lam, float total_w, int average, void *out, int out_dt,
                                 int64_t *kept)
{
    float bf[CHUNK], acc[CHUNK];
    int64_t nan = 0;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t m = widen(base, BF16, a, n, bf);
        for (int64_t k = 0; k < k_count; k++) {
            const uint16_t *ts = tasks[k] + a;
            const int32_t lk = (int32_t)(lo_key[k] < 0x7FFFFFFF ? lo_key[k] : 0x7FFFFFFF);
            const int32_t hk = (int32_t)(hi_key[k] < 0x7FFFFFFF ? hi_key[k] : 0x7FFFFFFF);
            const int32_t le = chunk_end(lo_end[k], a), he = chunk_end(hi_end[k], a);
            const float s = scale[k], wk = w[k];
            int32_t cnt = 0;
            for (int32_t j = 0; j < (int32_t)m; j++) {
                float t = from_bf16(ts[j]) - bf[j];
                int32_t kb = (int32_t)(bits_of(t) & M31);
                int32_t below_lo = (kb < lk) | ((kb == lk) & (j < le));
                int32_t below_hi = (kb < hk) | ((kb == hk) & (j < he));
                int32_t keep = below_hi & !below_lo;
                cnt += keep;
                float st = float_of(bits_of(t * s) & (uint32_t)(-keep));
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
        nan += store(acc, m, out, out_dt, a);
    }
    return nan;
}

/* TIES and EMR take the tasks of a chunk GROUP at a time, each group in one
 * loop (values kept in registers between its tasks), the groups in task
 * order: the same operations in the same order as one task at a time. The
 * loops over a group's tasks have a constant count (g, inlined), which the
 * compiler unrolls before it vectorises the loop over entries. */
#define GROUP 8

/* The pointers to a group's chunks (from task k on: g tasks; the unused
 * slots repeat the last, never read) and its weights (1 without w). */
INLINE int group_of(const float *const *ts, int64_t k_count, int64_t k, int64_t a,
                    const float *w, const float *tp[GROUP], float wp[GROUP])
{
    int g = k_count - k < GROUP ? (int)(k_count - k) : GROUP;
    for (int i = 0; i < GROUP; i++) {
        int64_t at = k + (i < g ? i : g - 1);
        tp[i] = ts[at] + a;
        wp[i] = w ? w[at] : 1.0f;
    }
    return g;
}

/* f(G) for the group's size g, a constant in each case */
#define BY_SIZE(g, f)                                                                              \
    switch (g) {                                                                                   \
    case 1:                                                                                        \
        f(1);                                                                                      \
        break;                                                                                     \
    case 2:                                                                                        \
        f(2);                                                                                      \
        break;                                                                                     \
    case 3:                                                                                        \
        f(3);                                                                                      \
        break;                                                                                     \
    case 4:                                                                                        \
        f(4);                                                                                      \
        break;                                                                                     \
    case 5:                                                                                        \
        f(5);                                                                                      \
        break;                                                                                     \
    case 6:                                                                                        \
        f(6);                                                                                      \
        break;                                                                                     \
    case 7:                                                                                        \
        f(7);                                                                                      \
        break;                                                                                     \
    default:                                                                                       \
        f(8);                                                                                      \
    }

/* Σ over a group of p_k = t_k·w_k (weighted) or t_k into total, in task
 * order; the first group starts from its first p_k. */
INLINE void sum_group(const float *tp[GROUP], const float wp[GROUP], const int g, const int first,
                      const int weighted, float *total, int64_t m)
{
    for (int64_t j = 0; j < m; j++) {
        float x = 0.0f;
        for (int i = 0; i < g; i++) {
            float p = weighted ? tp[i][j] * wp[i] : tp[i][j];
            x = i == 0 ? (first ? p : total[j] + p) : x + p;
        }
        total[j] = x;
    }
}

/* The total of a chunk (m entries from a), in task order: the weighted vote
 * Σ_k fl32(w_k)·t_k of combine.ties (w given), or Σ_k t_k of combine.emr. */
INLINE void chunk_total(const float *const *ts, int64_t k_count, int64_t a, int64_t m,
                        const float *w, float *total)
{
    const float *tp[GROUP];
    float wp[GROUP];
    for (int64_t k = 0; k < k_count; k += GROUP) {
        int g = group_of(ts, k_count, k, a, w, tp, wp);
        int first = k == 0;
#define SUM(G)                                                                                     \
    if (w && first)                                                                                \
        sum_group(tp, wp, G, 1, 1, total, m);                                                      \
    else if (w)                                                                                    \
        sum_group(tp, wp, G, 0, 1, total, m);                                                      \
    else if (first)                                                                                \
        sum_group(tp, wp, G, 1, 0, total, m);                                                      \
    else                                                                                           \
        sum_group(tp, wp, G, 0, 0, total, m)
        BY_SIZE(g, SUM)
#undef SUM
    }
}

/* the votes of a chunk of at most GROUP tasks in one loop: counts += (up, down) */
INLINE void votes_group(const float *tp[GROUP], const float wp[GROUP], const int g, int64_t m,
                        int64_t *counts)
{
    int32_t up = 0, down = 0; /* (32-bit lanes, like the values') */
    for (int64_t j = 0; j < m; j++) {
        float total = tp[0][j] * wp[0];
        for (int i = 1; i < g; i++)
            total = total + tp[i][j] * wp[i];
        up += total > 0;
        down += total < 0;
    }
    counts[0] += up;
    counts[1] += down;
}

/* Σ sign(vote) over a block as (up, down) counts: combine.ties_vote.
 * kernels.ties_votes. */
CLONES
void tadmerge_ties_votes(const float *const *ts, int64_t k_count, int64_t n, const float *w,
                         int64_t *up_down)
{
    float total[TCHUNK];
    int64_t up = 0, down = 0;
    if (k_count <= GROUP) { /* (the usual case) one loop */
        const float *tp[GROUP];
        float wp[GROUP];
        up_down[0] = up_down[1] = 0;
        for (int64_t a = 0; a < n; a += TCHUNK) {
            int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
            int g = group_of(ts, k_count, 0, a, w, tp, wp);
#define VOTES(G) votes_group(tp, wp, G, m, up_down)
            BY_SIZE(g, VOTES)
#undef VOTES
        }
        return;
    }
    for (int64_t a = 0; a < n; a += TCHUNK) {
        int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
        int32_t u = 0, d = 0;
        chunk_total(ts, k_count, a, m, w, total);
        for (int64_t j = 0; j < m; j++) {
            u += total[j] > 0;
            d += total[j] < 0;
        }
        up += u;
        down += d;
    }
    up_down[0] = up;
    up_down[1] = down;
}

/* x where the mask is all ones, +0.0 where it is zero: a select on the bits
 * (a conditional on floats keeps GCC from vectorising the loop) */
INLINE float masked(float x, uint32_t mask)
{
    return float_of(bits_of(x) & mask);
}

/* TIES' agreeing tasks of a group: q_k = p_k·s, num += q_k where q_k > 0,
 * den += w_k there, in task order */
INLINE void agree_group(const float *tp[GROUP], const float wp[GROUP], const int g, const float *sg,
                        float *num, float *den, int64_t m)
{
    for (int64_t j = 0; j < m; j++) {
        float s = sg[j], nm = num[j], dn = den[j];
        for (int i = 0; i < g; i++) {
            float q = (tp[i][j] * wp[i]) * s;
            uint32_t agree = -(uint32_t)(q > 0);
            nm = nm + masked(q, agree);
            dn = dn + masked(wp[i], agree);
        }
        num[j] = nm;
        den[j] = dn;
    }
}

/* whether some task of a group moved: p_k != 0 */
INLINE void moved_group(const float *tp[GROUP], const float wp[GROUP], const int g, int32_t *moved,
                        int64_t m)
{
    for (int64_t j = 0; j < m; j++) {
        int32_t mv = moved[j];
        for (int i = 0; i < g; i++)
            mv |= tp[i][j] * wp[i] != 0;
        moved[j] = mv;
    }
}

/* TIES of a chunk of at most GROUP tasks in one loop, every value in
 * registers: the operations of tadmerge_ties_merge's passes below, in the
 * same order. counts: up, down, cancellations. */
INLINE void ties_group(const float *tp[GROUP], const float wp[GROUP], const int g, const float *b,
                       float *out, int64_t m, float scale, uint32_t zero_sign, const int mean,
                       const int count_cancel, int64_t *counts)
{
    int32_t up = 0, down = 0, cancel = 0;
    for (int64_t j = 0; j < m; j++) {
        float p[GROUP];
        for (int i = 0; i < g; i++)
            p[i] = tp[i][j] * wp[i];
        float total = p[0];
        for (int i = 1; i < g; i++)
            total = total + p[i];
        int32_t pos = total > 0, neg = total < 0;
        up += pos;
        down += neg;
        uint32_t zero = (uint32_t)(!pos & !neg);
        float s = float_of(0x3F800000u | (uint32_t)neg << 31 | (zero_sign & -zero));
        if (count_cancel) {
            int32_t mv = 0;
            for (int i = 0; i < g; i++)
                mv |= p[i] != 0;
            cancel += (total == 0) & mv;
        }
        float nm = 0.0f, dn = 0.0f;
        for (int i = 0; i < g; i++) {
            float q = p[i] * s;
            uint32_t agree = -(uint32_t)(q > 0);
            nm = nm + masked(q, agree);
            dn = dn + masked(wp[i], agree);
        }
        float v;
        if (mean) {
            uint32_t none = -(uint32_t)(dn == 0);
            v = nm * s / float_of((bits_of(dn) & ~none) | (0x3F800000u & none));
        } else {
            v = nm * s;
        }
        out[j] = (v + 0.0f) * scale + b[j];
    }
    counts[0] += up;
    counts[1] += down;
    counts[2] += cancel;
}

/* TIES of a whole block, written over ts[0] (combine.ties, for finite
 * values): p_k = t_k·w_k, the vote total = ((p_1 + p_2) + p_3) + ..., the
 * elected sign s (zero totals take `majority`), num = Σ of the agreeing
 * q_k = p_k·s in task order from +0.0, den = Σ of their weights, merged =
 * (num·s / den (mean; 1 for a zero den) or num·s (sum)) + 0.0, ·scale + base.
 * out3: (up, down, cancellations: zero totals where some p_k != 0, when
 * count_cancel). kernels.ties_merge. */
CLONES
void tadmerge_ties_merge(float *const *ts, int64_t k_count, int64_t n, const float *w,
                         const float *base, float scale, int mean, int64_t majority,
                         int count_cancel, int64_t *out3)
{
    const float *const *cts = (const float *const *)ts;
    float total[TCHUNK], sg[TCHUNK], num[TCHUNK], den[TCHUNK];
    int32_t moved[TCHUNK];
    const float *tp[GROUP];
    float wp[GROUP];
    int64_t up = 0, down = 0, cancel = 0;
    /* the sign of a zero total: -1.0 (sign bit set) when the majority is not positive */
    const uint32_t zero_sign = majority > 0 ? 0u : 0x80000000u;
    if (k_count <= GROUP) { /* (the usual case) one loop */
        int64_t counts[3] = {0, 0, 0};
        for (int64_t a = 0; a < n; a += TCHUNK) {
            int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
            int g = group_of(cts, k_count, 0, a, w, tp, wp);
#define TIES(G, MEAN, CANCEL)                                                                      \
    ties_group(tp, wp, G, base + a, ts[0] + a, m, scale, zero_sign, MEAN, CANCEL, counts)
#define TIES_G(G)                                                                                  \
    if (mean && count_cancel)                                                                      \
        TIES(G, 1, 1);                                                                             \
    else if (mean)                                                                                 \
        TIES(G, 1, 0);                                                                             \
    else if (count_cancel)                                                                         \
        TIES(G, 0, 1);                                                                             \
    else                                                                                           \
        TIES(G, 0, 0)
            BY_SIZE(g, TIES_G)
#undef TIES_G
#undef TIES
        }
        out3[0] = counts[0];
        out3[1] = counts[1];
        out3[2] = counts[2];
        return;
    }
    for (int64_t a = 0; a < n; a += TCHUNK) {
        int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
        int32_t u = 0, d = 0, c = 0;
        chunk_total(cts, k_count, a, m, w, total);
        for (int64_t j = 0; j < m; j++) {
            int32_t pos = total[j] > 0, neg = total[j] < 0;
            u += pos;
            d += neg;
            /* ±1.0: negative where the total is, and at zero totals as the majority */
            uint32_t zero = (uint32_t)(!pos & !neg);
            sg[j] = float_of(0x3F800000u | (uint32_t)neg << 31 | (zero_sign & -zero));
            num[j] = 0.0f;
            den[j] = 0.0f;
            moved[j] = 0;
        }
        if (count_cancel) {
            for (int64_t k = 0; k < k_count; k += GROUP) {
                int g = group_of(cts, k_count, k, a, w, tp, wp);
#define MOVED(G) moved_group(tp, wp, G, moved, m)
                BY_SIZE(g, MOVED)
#undef MOVED
            }
            for (int64_t j = 0; j < m; j++)
                c += (total[j] == 0) & moved[j];
        }
        up += u;
        down += d;
        cancel += c;
        for (int64_t k = 0; k < k_count; k += GROUP) {
            int g = group_of(cts, k_count, k, a, w, tp, wp);
#define AGREE(G) agree_group(tp, wp, G, sg, num, den, m)
            BY_SIZE(g, AGREE)
#undef AGREE
        }
        float *out = ts[0] + a;
        const float *b = base + a;
        if (mean) {
            for (int64_t j = 0; j < m; j++) {
                uint32_t zero = -(uint32_t)(den[j] == 0);
                float d = float_of((bits_of(den[j]) & ~zero) | (0x3F800000u & zero));
                float v = num[j] * sg[j] / d;
                out[j] = (v + 0.0f) * scale + b[j];
            }
        } else {
            for (int64_t j = 0; j < m; j++) {
                float v = num[j] * sg[j];
                out[j] = (v + 0.0f) * scale + b[j];
            }
        }
    }
    out3[0] = up;
    out3[1] = down;
    out3[2] = cancel;
}

/* the 24-bit mantissa of a key (the bits of |x|), with the implicit bit of a
 * normal number; its exponent is key >> 23 */
INLINE int64_t mantissa(uint32_t key)
{
    return (int64_t)(key & 0x7FFFFFu) | (int64_t)((key >> 23) > 0) << 23;
}

/* tables per task of EMR's exact sums, entry j of a chunk into table j % 4
 * (four increments at a time, the tables added at the end): entries of one
 * exponent (the zeros of a sparse task vector) are then not one chain of
 * increments to one counter */
#define SUM_LANES 4

/* the keys' mantissas (mask: where they count) into the four tables of lt
 * (SUM_LANES × 256), by exponent */
INLINE void add_mantissas(const uint32_t *keys, const uint8_t *mask, int64_t m, int64_t *lt)
{
    int64_t *l0 = lt, *l1 = lt + 256, *l2 = lt + 512, *l3 = lt + 768;
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
        uint32_t k0 = keys[j], k1 = keys[j + 1], k2 = keys[j + 2], k3 = keys[j + 3];
        l0[k0 >> 23] += mantissa(k0) & (mask ? -(int64_t)mask[j] : -1);
        l1[k1 >> 23] += mantissa(k1) & (mask ? -(int64_t)mask[j + 1] : -1);
        l2[k2 >> 23] += mantissa(k2) & (mask ? -(int64_t)mask[j + 2] : -1);
        l3[k3 >> 23] += mantissa(k3) & (mask ? -(int64_t)mask[j + 3] : -1);
    }
    for (; j < m; j++)
        l0[keys[j] >> 23] += mantissa(keys[j]) & (mask ? -(int64_t)mask[j] : -1);
}

/* EMR of a whole block (combine.emr, for finite values): σ = +1 where Σ t_k
 * > 0 (summed in task order) else -1, M_k = [t_k·σ > 0] into row k of
 * `masks` (K × n bytes), τ_uni = σ·max_k(M_k·|t_k|) + 0.0 written over
 * ts[0], and the exact sums of the rescalers as integers per exponent e (the
 * key's top 8 bits): Σ of the 24-bit mantissas of |t_k| into abs_t[256k + e]
 * and of |τ_uni| where M_k into abs_u[256k + e], which
 * exact.exact_sum_by_exponent scales and adds. t_k·σ > 0 is t_k nonzero
 * with σ's sign, and |t_k·σ| = |t_k|: the maximum is taken on the bits, which
 * for values >= +0.0 are in the values' order. kernels.emr_merge. Returns -1
 * (nothing written) if its tables cannot be allocated. */
CLONES
int64_t tadmerge_emr_merge(float *const *ts, int64_t k_count, int64_t n, uint8_t *masks,
                           int64_t *abs_t, int64_t *abs_u)
{
    const float *const *cts = (const float *const *)ts;
    uint32_t sign[TCHUNK], mag[TCHUNK], keys[TCHUNK];
    float total[TCHUNK];
    int64_t *lt = calloc((size_t)(2 * k_count * SUM_LANES * 256), sizeof(int64_t));
    if (!lt)
        return -1;
    int64_t *lu = lt + k_count * SUM_LANES * 256;
    for (int64_t a = 0; a < n; a += TCHUNK) {
        int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
        chunk_total(cts, k_count, a, m, NULL, total);
        for (int64_t j = 0; j < m; j++) {
            sign[j] = (uint32_t)!(total[j] > 0) << 31; /* σ's sign bit */
            mag[j] = 0;
        }
        for (int64_t k = 0; k < k_count; k++) {
            const float *t = ts[k] + a;
            uint8_t *mk = masks + k * n + a;
            for (int64_t j = 0; j < m; j++) {
                uint32_t tb = bits_of(t[j]), key = tb & M31;
                uint32_t agree = (key != 0) & ((tb & 0x80000000u) == sign[j]);
                keys[j] = key;
                mk[j] = (uint8_t)agree;
                mag[j] = (key & -agree) > mag[j] ? key & -agree : mag[j];
            }
            add_mantissas(keys, NULL, m, lt + k * SUM_LANES * 256);
        }
        for (int64_t k = 0; k < k_count; k++)
            add_mantissas(mag, masks + k * n + a, m, lu + k * SUM_LANES * 256);
        float *out = ts[0] + a;
        for (int64_t j = 0; j < m; j++)
            out[j] = float_of(mag[j] | sign[j]) + 0.0f;
    }
    for (int64_t k = 0; k < k_count; k++) {
        for (int64_t e = 0; e < 256; e++) {
            int64_t st = 0, su = 0;
            for (int64_t l = 0; l < SUM_LANES; l++) {
                st += lt[(k * SUM_LANES + l) * 256 + e];
                su += lu[(k * SUM_LANES + l) * 256 + e];
            }
            abs_t[256 * k + e] += st;
            abs_u[256 * k + e] += su;
        }
    }
    free(lt);
    return 0;
}

/* MurmurHash3's 32-bit finalizer (sparsify.fmix32) */
INLINE uint32_t fmix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

/* DARE/DELLA's draws (sparsify._hash_into, the torch twin in int64 lanes):
 * out[j] = (h >> 8) / 2^24 with h = fmix32(fmix32((lo + j) ^ c1) + c2), for
 * the entries lo .. lo + n - 1 of a canonical block's stream whose index's
 * high 32 bits gave c1, c2 (the caller keeps lo + n <= 2^32). An integer
 * below 2^24 times 2^-24: exact in float32. kernels.uniform_draws. */
CLONES
void tadmerge_uniform_draws(float *out, int64_t n, int64_t lo, int64_t c1, int64_t c2)
{
    uint32_t l = (uint32_t)lo, k1 = (uint32_t)c1, k2 = (uint32_t)c2;
    for (int64_t j = 0; j < n; j++) {
        uint32_t h = fmix32(fmix32((l + (uint32_t)j) ^ k1) + k2);
        out[j] = (float)(h >> 8) * (1.0f / 16777216.0f);
    }
}

/* ---------------------------------------------------------------------------
 * RAM and RAMPlus (methods/ram.py ram_delta, the torch reference), per entry in
 * float32 as the reference's ops: moved_k = |t_k| > eps, c = the count of moved
 * tasks; part_k = t_k / max(c, 1), or t_k·lam[k] where c == 1 and use_lam[k];
 * the sum of the moved tasks' parts in task order (the first part, not moved,
 * is +0), plus θ0. Written over ts[0] (each entry's values are read first).
 * ------------------------------------------------------------------------- */

CLONES
void tadmerge_ram_merge(float *const *ts, int64_t k_count, int64_t n, const float *base, float eps,
                        const float *lam, const int8_t *use_lam)
{
    for (int64_t i = 0; i < n; i++) {
        float c = 0.0f;
        for (int64_t k = 0; k < k_count; k++)
            c += fabsf(ts[k][i]) > eps ? 1.0f : 0.0f;
        const int unique = c == 1.0f;
        const float d = c < 1.0f ? 1.0f : c;
        float acc = 0.0f;
        for (int64_t k = 0; k < k_count; k++) {
            float t = ts[k][i];
            float part = use_lam[k] && unique ? t * lam[k] : t / d;
            part = fabsf(t) > eps ? part : 0.0f;
            acc = k == 0 ? part : acc + part;
        }
        ts[0][i] = acc + base[i];
    }
}

/* Σ x² of n float32 values in float64 (engine/block.py square_sum, the report's
 * norms): eight lanes, added pairwise at the end */
CLONES
double tadmerge_square_sum(const float *x, int64_t n)
{
    double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) {
            double d = (double)x[i + j];
            lane[j] += d * d;
        }
    for (; i < n; i++) {
        double d = (double)x[i];
        lane[0] += d * d;
    }
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

/* ---------------------------------------------------------------------------
 * Histograms of a signed score's order keys (engine/signed.py, the torch
 * reference): the key of x is 2^31 + key(|x|) for x >= 0 (and -0.0), 2^31 −
 * 1 − key(|x|) for x < 0, key(|x|) its bits without the sign.
 * ------------------------------------------------------------------------- */

INLINE uint32_t order_key(uint32_t bits)
{
    uint32_t mag = bits & M31;
    return (bits >> 31) && mag ? 0x7FFFFFFFu - mag : 0x80000000u + mag;
}

/* counts[key >> 16] += 1 for n float32 values (bits) */
CLONES
void tadmerge_signed_coarse(const uint32_t *bits, int64_t n, int64_t *counts)
{
    for (int64_t i = 0; i < n; i++)
        counts[order_key(bits[i]) >> 16]++;
}

/* rows[slot[key >> 16]][key & 0xFFFF] += 1: slot maps each coarse bucket to
 * its row (a wanted bucket's, or the last row: every other bucket) */
CLONES
void tadmerge_signed_fine(const uint32_t *bits, int64_t n, const int32_t *slot, int64_t *rows)
{
    for (int64_t i = 0; i < n; i++) {
        uint32_t k = order_key(bits[i]);
        rows[(int64_t)slot[k >> 16] * 65536 + (k & 0xFFFFu)]++;
    }
}

/* RAMPlus's counts (methods/ram.py moved_counts, the torch reference): per task
 * k, its entries with |t_k| > eps together with another task's (shared,
 * counts[k]) and alone (unique, counts[k_count + k]), added into counts. */
CLONES
void tadmerge_ram_counts(const float *const *ts, int64_t k_count, int64_t n, float eps,
                         int64_t *counts)
{
    enum { TILE = 256 }; /* entries per tile: the counters stay in registers */
    int32_t c[TILE];
    for (int64_t i0 = 0; i0 < n; i0 += TILE) {
        int64_t m = n - i0 < TILE ? n - i0 : TILE;
        for (int64_t t = 0; t < m; t++)
            c[t] = 0;
        for (int64_t k = 0; k < k_count; k++)
            for (int64_t t = 0; t < m; t++)
                c[t] += fabsf(ts[k][i0 + t]) > eps;
        for (int64_t k = 0; k < k_count; k++) {
            int64_t shared = 0, unique = 0;
            for (int64_t t = 0; t < m; t++) {
                int32_t moved = fabsf(ts[k][i0 + t]) > eps;
                shared += moved & (c[t] > 1);
                unique += moved & (c[t] == 1);
            }
            counts[k] += shared;
            counts[k_count + k] += unique;
        }
    }
}

/* ---------------------------------------------------------------------------
 * DELLA by rows (methods/della.py block, the torch reference).
 *
 * Per row of m entries: the rank of each |τ| key in a stable ascending sort of
 * the row (smaller keys, then equal keys of smaller index), by an LSD radix
 * sort of bytes, which is stable (a byte that is the same for the whole row
 * takes no pass); then, in float64 as the reference computes it, the keep
 * probability p = lo + (c·rank)/(m − 1) (m > 1; else p = density), kept where
 * u < p, scaled by fl32(1/max(p, 1e-300)) with `inverse`. τ is rewritten in
 * place with t, row by row (each row's keys are taken before it is written).
 * Returns the kept count, or -1 if its buffers could not be allocated.
 * ------------------------------------------------------------------------- */

/* rank[j] of row k (m entries): a, b: m (key, index) pairs each, the key in
 * the high half (moved with its index: no gather per pass); count: 4 × 256 */
static void rank_row(const uint32_t *k, int64_t m, uint64_t *a, uint64_t *b, int64_t *count,
                     int32_t *rank)
{
    memset(count, 0, sizeof(int64_t) * 4 * 256);
    for (int64_t j = 0; j < m; j++) {
        uint32_t v = k[j];
        count[v & 255]++;
        count[256 + ((v >> 8) & 255)]++;
        count[512 + ((v >> 16) & 255)]++;
        count[768 + (v >> 24)]++;
        a[j] = (uint64_t)v << 32 | (uint64_t)j;
    }
    for (int d = 0; d < 4; d++) {
        int64_t *c = count + 256 * d;
        int shift = 32 + 8 * d;
        if (c[(a[0] >> shift) & 255] == m)
            continue; /* one value of this byte in the whole row */
        int64_t sum = 0;
        for (int q = 0; q < 256; q++) {
            int64_t n = c[q];
            c[q] = sum;
            sum += n;
        }
        for (int64_t j = 0; j < m; j++) {
            uint64_t v = a[j];
            b[c[(v >> shift) & 255]++] = v;
        }
        uint64_t *swap = a;
        a = b;
        b = swap;
    }
    for (int64_t j = 0; j < m; j++)
        rank[(uint32_t)a[j]] = (int32_t)j;
}

int64_t tadmerge_della_rows(float *tau, const float *u, int64_t rows, int64_t m, double lo,
                            double c, double density, int32_t inverse)
{
    size_t w = (size_t)(m > 0 ? m : 1);
    uint32_t *keys = malloc(sizeof(uint32_t) * w);
    uint64_t *idx = malloc(sizeof(uint64_t) * w);
    uint64_t *tmp = malloc(sizeof(uint64_t) * w);
    int32_t *rank = malloc(sizeof(int32_t) * w);
    int64_t *count = malloc(sizeof(int64_t) * 4 * 256);
    if (!keys || !idx || !tmp || !rank || !count || m > 2147483647LL) {
        free(keys), free(idx), free(tmp), free(rank), free(count);
        return -1;
    }
    int64_t kept = 0;
    for (int64_t r = 0; m > 0 && r < rows; r++) {
        float *t = tau + r * m;
        const float *ur = u + r * m;
        for (int64_t j = 0; j < m; j++)
            keys[j] = bits_of(t[j]) & M31;
        rank_row(keys, m, idx, tmp, count, rank);
        const double last = (double)(m - 1);
        for (int64_t j = 0; j < m; j++) {
            double p = m > 1 ? lo + (c * (double)rank[j]) / last : density;
            int keep = (double)ur[j] < p;
            float v = inverse ? t[j] * (float)(1.0 / (p > 1e-300 ? p : 1e-300)) : t[j];
            t[j] = keep ? v : 0.0f;
            kept += keep;
        }
    }
    free(keys), free(idx), free(tmp), free(rank), free(count);
    return kept;
}

/* ---------------------------------------------------------------------------
 * Exact sums of products (engine/sums.py exact_sums, the torch reference).
 *
 * A finite float32 is ±M·2^(e−150) with M < 2^24 and e = max(field, 1); the
 * product of two is ±P·2^(ei+ej−300), P = Mi·Mj < 2^48 exact in uint64. As the
 * reference does, P is split into hi = P >> 24 and lo = P mod 2^24 and each is
 * added, with the product's sign, to its bin: per (pair q, segment, exponent
 * sum ei + ej − b0, clamped to [0, nb) as the reference clamps it) in the int64
 * tables hi, lo laid out [np][n_seg][nb]. Integer adds are exact and
 * associative, so the tables hold the reference's integers whatever the order.
 *
 * No overflow: each term is below 2^24 in magnitude, so a bin overflows int64
 * only after 2^39 terms; a call takes at most kernels.PIECE = 2^30 entries
 * (|Δbin| < 2^54) and a block's tables add up at most its own entries, 2^39 of
 * them being 2 TiB of float32 per vector (the reference's int64 tables have
 * the same bound).
 *
 * The vectors: vs[j] over entries [0, n) of a piece that starts at entry `a`
 * of its block (the segment of block entry i is i / seg_size, or with `column`
 * i mod n_seg), each in its dtype dts[j] (dts[nv]: the base's), widened to
 * float32 as torch widens them; with sub[j], v_j is fl32(vs[j] − base), the
 * task vector made from the weights as block_vectors makes it (one IEEE float
 * subtraction).
 * ------------------------------------------------------------------------- */

/* entries per tile: their decoded parts stay in L1 */
#define SUMS_TILE 256

/* entry i of v_j: vs[j] of dtype dt, or with sub fl32(vs[j] − base), base of
 * dtype bdt (both constants where inlined) */
INLINE float sums_value(const void *v, const int dt, const void *base, const int bdt, int sub,
                        int64_t i)
{
    float x = load(v, dt, i);
    return sub ? x - load(base, bdt, i) : x;
}

/* v_j's float32 parts over a tile [i0, i0 + m): mantissa M, exponent e >= 1,
 * sign and Inf/NaN (the reference's _parts), one loop per dtype */
INLINE void sums_parts(const void *v, const int dt, const void *base, const int bdt, int sub,
                       int64_t i0, int64_t m, uint32_t *mj, int32_t *ej, uint8_t *nj, uint8_t *bj)
{
    for (int64_t t = 0; t < m; t++) {
        uint32_t k = bits_of(sums_value(v, dt, base, bdt, sub, i0 + t));
        uint32_t f = (k & M31) >> 23;
        mj[t] = (k & 0x7FFFFFu) | ((uint32_t)(f > 0) << 23);
        ej[t] = f > 0 ? (int32_t)f : 1;
        nj[t] = (uint8_t)(k >> 31);
        bj[t] = (uint8_t)(f == 255);
    }
}

/* the least and greatest exponent field of v_j over [0, n), into *lo, *hi */
INLINE void sums_fields(const void *v, const int dt, const void *base, const int bdt, int sub,
                        int64_t n, int32_t *lo, int32_t *hi)
{
    uint32_t mn = (uint32_t)*lo, mx = (uint32_t)*hi;
    for (int64_t i = 0; i < n; i++) {
        uint32_t f = (bits_of(sums_value(v, dt, base, bdt, sub, i)) & M31) >> 23;
        mn = f < mn ? f : mn;
        mx = f > mx ? f : mx;
    }
    *lo = (int32_t)mn;
    *hi = (int32_t)mx;
}

/* calls F(v, dt, base, bdt, sub, ...) with the dtypes and sub as constants for
 * the usual cases (float32 blocks of the torch engine, raw bf16 inputs) */
#define SUMS_BY_DTYPE(F, v, dt, base, bdt, sub, ...)                                              \
    do {                                                                                           \
        if ((dt) == F32 && !(sub))                                                                 \
            F(v, F32, base, F32, 0, __VA_ARGS__);                                                  \
        else if ((dt) == F32 && (bdt) == F32)                                                      \
            F(v, F32, base, F32, 1, __VA_ARGS__);                                                  \
        else if ((dt) == BF16 && !(sub))                                                           \
            F(v, BF16, base, BF16, 0, __VA_ARGS__);                                                \
        else if ((dt) == BF16 && (bdt) == BF16)                                                    \
            F(v, BF16, base, BF16, 1, __VA_ARGS__);                                                \
        else                                                                                       \
            F(v, dt, base, bdt, sub, __VA_ARGS__);                                                 \
    } while (0)

/* the least and greatest exponent field (0 .. 255) of each vector, as the
 * reference's first pass takes them (lo, hi: nv entries, updated: min, max) */
CLONES
void tadmerge_sums_range(const void *const *vs, const int32_t *dts, const void *base,
                         const int8_t *sub, int64_t nv, int64_t n, int32_t *lo, int32_t *hi)
{
    for (int64_t j = 0; j < nv; j++)
        SUMS_BY_DTYPE(sums_fields, vs[j], dts[j], base, dts[nv], sub[j], n, lo + j, hi + j);
}

/* adds the piece's products into hi, lo (see above); returns the count the
 * reference adds to `nonfinite`: per pair, the entries where either value is
 * Inf or NaN (their bits are binned all the same, as the reference bins them).
 * -1 if the tile buffers could not be allocated. */
CLONES
int64_t tadmerge_sums_accumulate(const void *const *vs, const int32_t *dts, const void *base,
                                 const int8_t *sub, int64_t nv, int64_t n, const int32_t *pi, const int32_t *pj,
                                 int64_t np, int64_t a, int64_t seg_size, int64_t n_seg,
                                 int32_t column, int64_t b0, int64_t nb, int64_t *hi, int64_t *lo)
{
    uint32_t *mant = malloc(sizeof(uint32_t) * SUMS_TILE * (size_t)nv);
    int32_t *expo = malloc(sizeof(int32_t) * SUMS_TILE * (size_t)nv);
    uint8_t *neg = malloc((size_t)SUMS_TILE * (size_t)nv);
    uint8_t *bad = malloc((size_t)SUMS_TILE * (size_t)nv);
    int64_t *row = malloc(sizeof(int64_t) * SUMS_TILE);
    int64_t th[SUMS_TILE], tl[SUMS_TILE], tb[SUMS_TILE];
    if (!mant || !expo || !neg || !bad || !row) {
        free(mant), free(expo), free(neg), free(bad), free(row);
        return -1;
    }
    const int64_t plane = n_seg * nb; /* one pair's table */
    int64_t nonfinite = 0;
    int64_t i0 = 0;
    while (i0 < n) {
        int64_t g = a + i0; /* the tile's first block entry */
        int64_t m = n - i0 < SUMS_TILE ? n - i0 : SUMS_TILE;
        if (column) {
            int64_t s = g % n_seg;
            for (int64_t t = 0; t < m; t++) {
                row[t] = s * nb;
                s = s + 1 == n_seg ? 0 : s + 1;
            }
        } else { /* a tile inside one segment */
            int64_t s = g / seg_size, end = (s + 1) * seg_size - a;
            if (end - i0 < m)
                m = end - i0;
            for (int64_t t = 0; t < m; t++)
                row[t] = s * nb;
        }
        for (int64_t j = 0; j < nv; j++) {
            uint32_t *mj = mant + j * SUMS_TILE;
            int32_t *ej = expo + j * SUMS_TILE;
            uint8_t *nj = neg + j * SUMS_TILE, *bj = bad + j * SUMS_TILE;
            SUMS_BY_DTYPE(sums_parts, vs[j], dts[j], base, dts[nv], sub[j], i0, m, mj, ej, nj, bj);
        }
        for (int64_t q = 0; q < np; q++) {
            const uint32_t *mx = mant + pi[q] * SUMS_TILE, *my = mant + pj[q] * SUMS_TILE;
            const int32_t *ex = expo + pi[q] * SUMS_TILE, *ey = expo + pj[q] * SUMS_TILE;
            const uint8_t *nx = neg + pi[q] * SUMS_TILE, *ny = neg + pj[q] * SUMS_TILE;
            const uint8_t *bx = bad + pi[q] * SUMS_TILE, *by = bad + pj[q] * SUMS_TILE;
            int64_t *hq = hi + q * plane, *lq = lo + q * plane;
            /* the products' parts and bins (a loop the compiler vectorizes), then
             * their adds into the tables (scattered: one at a time) */
            for (int64_t t = 0; t < m; t++) {
                uint64_t p = (uint64_t)mx[t] * (uint64_t)my[t];
                int64_t s = (int64_t)(nx[t] ^ ny[t]); /* 1: negative */
                th[t] = ((int64_t)(p >> 24) ^ -s) + s;
                tl[t] = ((int64_t)(p & 0xFFFFFFu) ^ -s) + s;
                int64_t b = (int64_t)ex[t] + ey[t] - b0;
                b = b < 0 ? 0 : b >= nb ? nb - 1 : b;
                tb[t] = row[t] + b;
                nonfinite += bx[t] | by[t];
            }
            for (int64_t t = 0; t < m; t++) {
                hq[tb[t]] += th[t];
                lq[tb[t]] += tl[t];
            }
        }
        i0 += m;
    }
    free(mant), free(expo), free(neg), free(bad), free(row);
    return nonfinite;
}
