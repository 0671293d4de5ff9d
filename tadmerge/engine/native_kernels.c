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
#include <stdint.h>
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
    float bf[CHUNK], acc[CHUNK];
    int64_t nan = 0;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t m = widen(base, dts[0], a, n, bf);
        for (int64_t k = 0; k < k_count; k++) {
            const int dt = dts[1 + k];
            const void *ts = from(tasks[k], dt, a);
            double *lane = lanes + k * CHUNK;
            switch (dt) {
            case BF16:
                stream_task(ts, BF16, bf, m, w[k], k == 0, average, lane, acc);
                break;
            case F16:
                stream_task(ts, F16, bf, m, w[k], k == 0, average, lane, acc);
                break;
            case F32:
                stream_task(ts, F32, bf, m, w[k], k == 0, average, lane, acc);
                break;
            default:
                stream_task(ts, F64, bf, m, w[k], k == 0, average, lane, acc);
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

/* A resolved selection applied to a float32 block in place, in flat order
 * (sparsify.apply_cuts): an entry is kept when its key is below the high cut
 * and not below the low one, ties at a cut key being below it before the
 * index where the block's quota of them ends (tie_end); kept entries become
 * t·fl32(scale) (when rescale), the others +0.0. Cut keys below 0 mean "all
 * below". Branch-free where the data decides (keep or drop is a coin flip at
 * TADrop's rates). Returns the kept count. kernels.cut_block. */
CLONES
int64_t tadmerge_cut_pass(float *t, int64_t n, int64_t lo_key, int64_t lo_end, int64_t hi_key,
                          int64_t hi_end, float scale, int rescale)
{
    const int64_t lk = lo_key < 0 ? (int64_t)1 << 31 : lo_key;
    const int64_t hk = hi_key < 0 ? (int64_t)1 << 31 : hi_key;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = rescale ? t[i] * scale : t[i];
        int64_t k = bits_of(t[i]) & M31;
        int64_t below_lo = (k < lk) | ((k == lk) & (i < lo_end));
        int64_t below_hi = (k < hk) | ((k == hk) & (i < hi_end));
        int64_t keep = below_hi & !below_lo;
        kept += keep;
        t[i] = float_of(bits_of(v) & (uint32_t)-keep);
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
            /* the tie ends as indices into this chunk, clamped to [-1, CHUNK + 1] */
            int64_t le64 = lo_end[k] - a, he64 = hi_end[k] - a;
            const int32_t le = (int32_t)(le64 < -1 ? -1 : le64 > CHUNK + 1 ? CHUNK + 1 : le64);
            const int32_t he = (int32_t)(he64 < -1 ? -1 : he64 > CHUNK + 1 ? CHUNK + 1 : he64);
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

/* The weighted vote Σ_k fl32(w_k)·t_k of a chunk (m entries from a), in task
 * order: combine.ties' `total`. */
INLINE void ties_total(const float *const *ts, int64_t k_count, int64_t a, int64_t m,
                       const float *w, float *total)
{
    for (int64_t j = 0; j < m; j++)
        total[j] = ts[0][a + j] * w[0];
    for (int64_t k = 1; k < k_count; k++) {
        const float *t = ts[k] + a;
        const float wk = w[k];
        for (int64_t j = 0; j < m; j++)
            total[j] = total[j] + t[j] * wk;
    }
}

/* Σ sign(vote) over a block as (up, down) counts: combine.ties_vote.
 * kernels.ties_votes. */
CLONES
void tadmerge_ties_votes(const float *const *ts, int64_t k_count, int64_t n, const float *w,
                         int64_t *up_down)
{
    float total[TCHUNK];
    int64_t up = 0, down = 0;
    for (int64_t a = 0; a < n; a += TCHUNK) {
        int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
        ties_total(ts, k_count, a, m, w, total);
        for (int64_t j = 0; j < m; j++) {
            up += total[j] > 0;
            down += total[j] < 0;
        }
    }
    up_down[0] = up;
    up_down[1] = down;
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
    float total[TCHUNK], sg[TCHUNK], num[TCHUNK], den[TCHUNK];
    int32_t moved[TCHUNK];
    int64_t up = 0, down = 0, cancel = 0;
    for (int64_t a = 0; a < n; a += TCHUNK) {
        int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
        ties_total((const float *const *)ts, k_count, a, m, w, total);
        for (int64_t j = 0; j < m; j++) {
            up += total[j] > 0;
            down += total[j] < 0;
            if (majority > 0)
                sg[j] = total[j] < 0 ? -1.0f : 1.0f;
            else
                sg[j] = total[j] > 0 ? 1.0f : -1.0f;
            num[j] = 0.0f;
            den[j] = 0.0f;
        }
        if (count_cancel) {
            for (int64_t j = 0; j < m; j++)
                moved[j] = 0;
            for (int64_t k = 0; k < k_count; k++) {
                const float *t = ts[k] + a;
                const float wk = w[k];
                for (int64_t j = 0; j < m; j++)
                    moved[j] |= t[j] * wk != 0;
            }
            for (int64_t j = 0; j < m; j++)
                cancel += (total[j] == 0) & moved[j];
        }
        for (int64_t k = 0; k < k_count; k++) {
            const float *t = ts[k] + a;
            const float wk = w[k];
            for (int64_t j = 0; j < m; j++) {
                float q = (t[j] * wk) * sg[j];
                int agree = q > 0;
                num[j] = num[j] + (agree ? q : 0.0f);
                den[j] = den[j] + (agree ? wk : 0.0f);
            }
        }
        float *out = ts[0] + a;
        const float *b = base + a;
        if (mean) {
            for (int64_t j = 0; j < m; j++) {
                float v = num[j] * sg[j] / (den[j] != 0 ? den[j] : 1.0f);
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

/* EMR of a whole block (combine.emr, for finite values): σ = +1 where Σ t_k
 * > 0 (summed in task order) else -1, M_k = [t_k·σ > 0] into row k of
 * `masks` (K × n bytes), τ_uni = σ·max_k(M_k·|t_k|) + 0.0 written over
 * ts[0], and the exact sums of the rescalers as integers per exponent e (the
 * key's top 8 bits): Σ of the 24-bit mantissas of |t_k| into abs_t[256k + e]
 * and of |τ_uni| where M_k into abs_u[256k + e], which
 * exact.exact_sum_by_exponent scales and adds. kernels.emr_merge. */
CLONES
void tadmerge_emr_merge(float *const *ts, int64_t k_count, int64_t n, uint8_t *masks,
                        int64_t *abs_t, int64_t *abs_u)
{
    float total[TCHUNK], sg[TCHUNK], mag[TCHUNK];
    int32_t ue[TCHUNK];
    int64_t um[TCHUNK];
    for (int64_t a = 0; a < n; a += TCHUNK) {
        int64_t m = n - a < TCHUNK ? n - a : TCHUNK;
        for (int64_t j = 0; j < m; j++)
            total[j] = ts[0][a + j];
        for (int64_t k = 1; k < k_count; k++) {
            const float *t = ts[k] + a;
            for (int64_t j = 0; j < m; j++)
                total[j] = total[j] + t[j];
        }
        for (int64_t j = 0; j < m; j++) {
            sg[j] = total[j] > 0 ? 1.0f : -1.0f;
            mag[j] = 0.0f;
        }
        for (int64_t k = 0; k < k_count; k++) {
            const float *t = ts[k] + a;
            uint8_t *mk = masks + k * n + a;
            int64_t *at = abs_t + 256 * k;
            for (int64_t j = 0; j < m; j++) {
                uint32_t key = bits_of(t[j]) & M31, e = key >> 23;
                at[e] += (int64_t)(key & 0x7FFFFFu) | ((int64_t)(e > 0) << 23);
            }
            for (int64_t j = 0; j < m; j++) {
                float q = t[j] * sg[j];
                int agree = q > 0;
                float x = agree ? q : 0.0f;
                mk[j] = (uint8_t)agree;
                mag[j] = x > mag[j] ? x : mag[j];
            }
        }
        for (int64_t j = 0; j < m; j++) {
            uint32_t key = bits_of(mag[j]) & M31, e = key >> 23;
            ue[j] = (int32_t)e;
            um[j] = (int64_t)(key & 0x7FFFFFu) | ((int64_t)(e > 0) << 23);
        }
        for (int64_t k = 0; k < k_count; k++) {
            const uint8_t *mk = masks + k * n + a;
            int64_t *au = abs_u + 256 * k;
            for (int64_t j = 0; j < m; j++)
                if (mk[j])
                    au[ue[j]] += um[j];
        }
        float *out = ts[0] + a;
        for (int64_t j = 0; j < m; j++)
            out[j] = mag[j] * sg[j] + 0.0f;
    }
}
