/* memnet._scan: the int8 candidate pass of memnet's exact search (memnet/quantized.py), and
 * the nearest slots of many small memories at once (memnet/dense.py: rank(), near the end).
 *
 * The candidate pass is two functions, both on buffers that memnet/quantized.py lays out and
 * owns:
 *
 *   minima(...)  per query and per block of 16 rows, the smallest int8 distance estimate
 *                    est(s, q) = norm[s] + (coef[s] * qscale[q]) * (float)(cm_s . cv_q)
 *                where cm_s, cv_q are the int8 codes of row s and query q, coef[s] =
 *                -2 * scale[s], norm[s] = |m_s|^2 in float32 (+inf for an empty, excluded
 *                or padding row). The integer dot product is exact (int32, no saturation:
 *                see below), and the float operations are the same three roundings in the
 *                same order on every path, so every path returns the same bits.
 *   select(...)  per query, the blocks whose lower bound (minimum - bound) is at most the
 *                want-th smallest upper bound (minimum + bound); then their rows, estimated
 *                one by one, whose lower bound is at most the want-th smallest row upper
 *                bound (the query's cut): the rows, their upper bounds, and the cut.
 *
 * Layout: rows in blocks of LANES = 16 (a block is the unit of selection, a "group"); a
 * block holds dim/4 chunks of 64 bytes, chunk d holding dims 4d..4d+3 of its 16 rows
 * (lane * 4 + j). One vpdpbusd then adds four dims of 16 rows, and a block's rows are 1 KiB
 * of contiguous memory when select estimates them again.
 *
 * Paths (chosen at run time, `isa` argument: 0 = the best this CPU has):
 *   3 AVX-512 VNNI: vpdpbusd, unsigned query bytes (code + 128) times signed row codes,
 *     four products summed into each int32 lane without saturation; query codes in
 *     [-127, 127].
 *   2 AVX2: vpmaddubsw + vpmaddwd. vpmaddubsw saturates its int16 pair sums, so the query
 *     codes must stay in [-63, 63] (offset 64: 2 * 127 * 127 = 32,258 < 32,767, exact).
 *   1 portable C: any code range; CI runs it too (tests/test_quantized.py forces each path).
 * The caller quantizes queries to the range of the path it uses (`qmax`) and passes the
 * offset added to make them unsigned; the row-code sums undo it: cm . (cv + o) - o sum(cm).
 * A minimum is exact whatever the order it is taken in (no NaN or -0 can occur).
 *
 * Built with -ffp-contract=off: a * b + c stays two roundings on every path (no FMA).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define MEMNET_X86 1
#include <immintrin.h>
#endif

#define LANES 16
#define QB 8 /* queries per register tile (then one at a time for the rest) */

typedef struct {
    const int8_t *codes;   /* [blocks, dim4, LANES, 4] */
    const int32_t *rowsum; /* [rows] sum of each row's codes */
    const float *coef;     /* [rows] -2 * scale */
    const float *norm;     /* [rows] squared norms, +inf: never a candidate */
    const uint8_t *q;      /* [nq, dim4 * 4] query codes + offset */
    const float *qscale;   /* [nq] */
    float *out;            /* [nq, blocks] */
    Py_ssize_t blocks, dim4, nq;
    int32_t offset;
} Scan;

/* The 16 estimates of one block for one query: the same bits on every path. */
typedef void (*BlockFn)(const Scan *, Py_ssize_t, Py_ssize_t, float *);

/* The 16 estimates of block blk for query qi. */
static void block_portable(const Scan *s, Py_ssize_t blk, Py_ssize_t qi, float *est)
{
    const Py_ssize_t dim = s->dim4 * 4, r0 = blk * LANES;
    const int8_t *rows = s->codes + blk * LANES * dim;
    const uint8_t *q = s->q + qi * dim;
    int32_t acc[LANES];
    for (int l = 0; l < LANES; l++)
        acc[l] = -s->offset * s->rowsum[r0 + l];
    for (Py_ssize_t d = 0; d < s->dim4; d++)
        for (int l = 0; l < LANES; l++)
            for (int j = 0; j < 4; j++)
                acc[l] += (int32_t)q[4 * d + j] * rows[d * 64 + l * 4 + j];
    for (int l = 0; l < LANES; l++) {
        const float a = s->coef[r0 + l] * s->qscale[qi];
        est[l] = s->norm[r0 + l] + a * (float)acc[l];
    }
}

static void minima_portable(const Scan *s)
{
    float est[LANES];
    for (Py_ssize_t blk = 0; blk < s->blocks; blk++)
        for (Py_ssize_t qi = 0; qi < s->nq; qi++) {
            block_portable(s, blk, qi, est);
            float lo = est[0];
            for (int l = 1; l < LANES; l++)
                lo = est[l] < lo ? est[l] : lo;
            s->out[qi * s->blocks + blk] = lo;
        }
}

#ifdef MEMNET_X86
/* The queries left after the tiles of 8 (rest < 8, from q0): tiles of 4, 2 and 1, each call
 * with a constant count so the inlined tile keeps its accumulators in registers. */
#define TAILS(tile, s, blk, q0, rest)                                                          \
    do {                                                                                       \
        Py_ssize_t at_ = (q0);                                                                 \
        if ((rest) & 4) {                                                                      \
            tile(s, blk, at_, 4);                                                              \
            at_ += 4;                                                                          \
        }                                                                                      \
        if ((rest) & 2) {                                                                      \
            tile(s, blk, at_, 2);                                                              \
            at_ += 2;                                                                          \
        }                                                                                      \
        if ((rest) & 1)                                                                        \
            tile(s, blk, at_, 1);                                                              \
    } while (0)

#define AVX2 __attribute__((target("avx2")))
#define VNNI __attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni")))

static inline AVX2 __m256 hmin8(__m256 v)
{
    v = _mm256_min_ps(v, _mm256_permute2f128_ps(v, v, 1));
    v = _mm256_min_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm256_min_ps(v, _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
}

/* Queries q0..q0+qb-1 against block blk: their 16 estimates each into est[i][0..1]. qb is
 * a constant where this is inlined, so the accumulators stay in registers. */
static inline AVX2 __attribute__((always_inline)) void
tile_avx2(const Scan *s, Py_ssize_t blk, Py_ssize_t q0, const int qb, __m256 est[][2])
{
    const Py_ssize_t dim = s->dim4 * 4, r0 = blk * LANES;
    const int8_t *rows = s->codes + blk * LANES * dim;
    const __m256i ones = _mm256_set1_epi16(1), neg = _mm256_set1_epi32(-s->offset);
    for (int h = 0; h < 2; h++) { /* rows 0-7, then 8-15 of the block */
        const __m256i bias = _mm256_mullo_epi32(
            _mm256_loadu_si256((const __m256i *)(s->rowsum + r0 + 8 * h)), neg);
        __m256i acc[QB];
        _Pragma("GCC unroll 8") for (int i = 0; i < qb; i++) acc[i] = bias;
        for (Py_ssize_t d = 0; d < s->dim4; d++) {
            const __m256i r = _mm256_loadu_si256((const __m256i *)(rows + d * 64 + 32 * h));
            _Pragma("GCC unroll 8") for (int i = 0; i < qb; i++)
            {
                int32_t word;
                memcpy(&word, s->q + (q0 + i) * dim + 4 * d, 4);
                const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi32(word), r);
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, ones));
            }
        }
        const __m256 coef = _mm256_loadu_ps(s->coef + r0 + 8 * h);
        const __m256 norm = _mm256_loadu_ps(s->norm + r0 + 8 * h);
        _Pragma("GCC unroll 8") for (int i = 0; i < qb; i++)
        {
            const __m256 a = _mm256_mul_ps(coef, _mm256_set1_ps(s->qscale[q0 + i]));
            est[i][h] = _mm256_add_ps(norm, _mm256_mul_ps(a, _mm256_cvtepi32_ps(acc[i])));
        }
    }
}

static AVX2 void block_avx2(const Scan *s, Py_ssize_t blk, Py_ssize_t qi, float *out)
{
    __m256 est[1][2];
    tile_avx2(s, blk, qi, 1, est);
    _mm256_storeu_ps(out, est[0][0]);
    _mm256_storeu_ps(out + 8, est[0][1]);
}

static inline AVX2 __attribute__((always_inline)) void
tiles_avx2(const Scan *s, Py_ssize_t blk, Py_ssize_t q0, const int qb)
{
    __m256 est[QB][2];
    tile_avx2(s, blk, q0, qb, est);
    for (int i = 0; i < qb; i++)
        s->out[(q0 + i) * s->blocks + blk] =
            _mm256_cvtss_f32(hmin8(_mm256_min_ps(est[i][0], est[i][1])));
}

/* Block by block, as minima_vnni: tiles of 8 queries, then of 4, 2 and 1. */
static AVX2 void minima_avx2(const Scan *s)
{
    const Py_ssize_t tiled = s->nq / QB * QB, rest = s->nq - tiled;
    for (Py_ssize_t blk = 0; blk < s->blocks; blk++) {
        for (Py_ssize_t q0 = 0; q0 < tiled; q0 += QB)
            tiles_avx2(s, blk, q0, QB);
        TAILS(tiles_avx2, s, blk, tiled, rest);
    }
}

/* As tile_avx2, one register of 16 estimates per query. */
static inline VNNI __attribute__((always_inline)) void
tile_vnni(const Scan *s, Py_ssize_t blk, Py_ssize_t q0, const int qb, __m512 *est)
{
    const Py_ssize_t dim = s->dim4 * 4, r0 = blk * LANES;
    const int8_t *rows = s->codes + blk * LANES * dim;
    const __m512i bias =
        _mm512_mullo_epi32(_mm512_loadu_si512(s->rowsum + r0), _mm512_set1_epi32(-s->offset));
    __m512i acc[QB];
    _Pragma("GCC unroll 8") for (int i = 0; i < qb; i++) acc[i] = bias;
    for (Py_ssize_t d = 0; d < s->dim4; d++) {
        const __m512i r = _mm512_loadu_si512(rows + d * 64);
        _Pragma("GCC unroll 8") for (int i = 0; i < qb; i++)
        {
            int32_t word;
            memcpy(&word, s->q + (q0 + i) * dim + 4 * d, 4);
            acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(word), r);
        }
    }
    const __m512 coef = _mm512_loadu_ps(s->coef + r0);
    const __m512 norm = _mm512_loadu_ps(s->norm + r0);
    _Pragma("GCC unroll 8") for (int i = 0; i < qb; i++)
    {
        const __m512 a = _mm512_mul_ps(coef, _mm512_set1_ps(s->qscale[q0 + i]));
        est[i] = _mm512_add_ps(norm, _mm512_mul_ps(a, _mm512_cvtepi32_ps(acc[i])));
    }
}

static VNNI void block_vnni(const Scan *s, Py_ssize_t blk, Py_ssize_t qi, float *out)
{
    __m512 est[1];
    tile_vnni(s, blk, qi, 1, est);
    _mm512_storeu_ps(out, est[0]);
}

/* The minima of 8 registers: query k < 4 at lane 4k, query 4 + k at lane 4k + 2. */
static inline VNNI __m512 min8_vnni(const __m512 *e)
{
    __m512 m[4];
    for (int i = 0; i < 4; i++) /* chunks 0-1: query 2i, chunks 2-3: query 2i + 1 */
        m[i] = _mm512_min_ps(_mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(e[2 * i], e[2 * i + 1], 0xEE));
    __m512 h[2];
    for (int i = 0; i < 2; i++) /* chunk k: query 4i + k */
        h[i] = _mm512_min_ps(_mm512_shuffle_f32x4(m[2 * i], m[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(m[2 * i], m[2 * i + 1], 0xDD));
    const __m512 v = _mm512_min_ps(_mm512_shuffle_ps(h[0], h[1], 0x44),
                                   _mm512_shuffle_ps(h[0], h[1], 0xEE));
    return _mm512_min_ps(v, _mm512_permute_ps(v, 0xB1));
}

/* One query: its broadcast codes made once, and four dpbusd chains (one would wait on its
 * latency); integer sums, exact in any order. */
static VNNI void single_vnni(const Scan *s, Py_ssize_t qi, __m512i *qv)
{
    const Py_ssize_t dim = s->dim4 * 4, d4 = s->dim4 & ~(Py_ssize_t)3;
    const __m512i neg = _mm512_set1_epi32(-s->offset);
    const __m512 qs = _mm512_set1_ps(s->qscale[qi]);
    for (Py_ssize_t d = 0; d < s->dim4; d++) {
        int32_t word;
        memcpy(&word, s->q + qi * dim + 4 * d, 4);
        qv[d] = _mm512_set1_epi32(word);
    }
    for (Py_ssize_t blk = 0; blk < s->blocks; blk++) {
        const Py_ssize_t r0 = blk * LANES;
        const int8_t *rows = s->codes + blk * LANES * dim;
        __m512i acc = _mm512_mullo_epi32(_mm512_loadu_si512(s->rowsum + r0), neg);
        __m512i p0 = _mm512_setzero_si512(), p1 = p0, p2 = p0;
        Py_ssize_t d = 0;
        for (; d < d4; d += 4) {
            acc = _mm512_dpbusd_epi32(acc, qv[d], _mm512_loadu_si512(rows + d * 64));
            p0 = _mm512_dpbusd_epi32(p0, qv[d + 1], _mm512_loadu_si512(rows + d * 64 + 64));
            p1 = _mm512_dpbusd_epi32(p1, qv[d + 2], _mm512_loadu_si512(rows + d * 64 + 128));
            p2 = _mm512_dpbusd_epi32(p2, qv[d + 3], _mm512_loadu_si512(rows + d * 64 + 192));
        }
        for (; d < s->dim4; d++)
            acc = _mm512_dpbusd_epi32(acc, qv[d], _mm512_loadu_si512(rows + d * 64));
        acc = _mm512_add_epi32(_mm512_add_epi32(acc, p0), _mm512_add_epi32(p1, p2));
        const __m512 a = _mm512_mul_ps(_mm512_loadu_ps(s->coef + r0), qs);
        const __m512 est =
            _mm512_add_ps(_mm512_loadu_ps(s->norm + r0), _mm512_mul_ps(a, _mm512_cvtepi32_ps(acc)));
        s->out[qi * s->blocks + blk] = _mm512_reduce_min_ps(est);
    }
}

/* The minima of queries q0..q0+qb-1 (qb < 8) against block blk. */
static inline VNNI __attribute__((always_inline)) void
tail_vnni(const Scan *s, Py_ssize_t blk, Py_ssize_t q0, const int qb)
{
    __m512 est[QB];
    tile_vnni(s, blk, q0, qb, est);
    for (int i = 0; i < qb; i++)
        s->out[(q0 + i) * s->blocks + blk] = _mm512_reduce_min_ps(est[i]);
}

/* Block by block, each block's 1 KiB read once for every query: tiles of 8 queries, then
 * tiles of 4, 2 and 1 for the rest. One query alone takes single_vnni. Returns -1 when out
 * of memory (its broadcast codes). */
static VNNI int minima_vnni(const Scan *s)
{
    if (s->nq == 1) {
        __m512i *qv = PyMem_RawMalloc(s->dim4 * sizeof(__m512i) + 64);
        if (!qv)
            return -1;
        single_vnni(s, 0, (__m512i *)(((uintptr_t)qv + 63) & ~(uintptr_t)63));
        PyMem_RawFree(qv);
        return 0;
    }
    const Py_ssize_t tiled = s->nq / QB * QB, rest = s->nq - tiled;
    __m512 est[QB];
    float lanes[LANES];
    for (Py_ssize_t blk = 0; blk < s->blocks; blk++) {
        for (Py_ssize_t q0 = 0; q0 < tiled; q0 += QB) {
            tile_vnni(s, blk, q0, QB, est);
            _mm512_storeu_ps(lanes, min8_vnni(est));
            for (int k = 0; k < 4; k++) {
                s->out[(q0 + k) * s->blocks + blk] = lanes[4 * k];
                s->out[(q0 + 4 + k) * s->blocks + blk] = lanes[4 * k + 2];
            }
        }
        TAILS(tail_vnni, s, blk, tiled, rest);
    }
    return 0;
}
#endif

static int best_isa(void)
{
#ifdef MEMNET_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return 3;
    if (__builtin_cpu_supports("avx2"))
        return 2;
#endif
    return 1;
}

/* a * b for counts from Python; -1 when either is negative (or -1) or the product overflows,
 * which check() then refuses: no size computed from bad arguments can wrap around. */
static Py_ssize_t product(Py_ssize_t a, Py_ssize_t b)
{
    Py_ssize_t r;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r))
        return -1;
    return r;
}

/* A buffer argument of at least `items` elements of `size` bytes, C-contiguous. */
static int check(Py_buffer *b, Py_ssize_t items, Py_ssize_t size, const char *name)
{
    const Py_ssize_t bytes = product(items, size);
    if (bytes < 0) {
        PyErr_Format(PyExc_ValueError, "%s: a count is negative or too large", name);
        return -1;
    }
    if (b->len < bytes || b->itemsize != size) {
        PyErr_Format(PyExc_ValueError, "%s: need %zd items of %zd bytes, got %zd bytes of %zd",
                     name, items, size, b->len, b->itemsize);
        return -1;
    }
    return 0;
}

static PyObject *py_minima(PyObject *self, PyObject *args)
{
    Py_buffer codes, rowsum, coef, norm, q, qscale, out;
    Py_ssize_t blocks, dim4, nq;
    int offset, isa, failed = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*nnnii", &codes, &rowsum, &coef, &norm, &q,
                          &qscale, &out, &blocks, &dim4, &nq, &offset, &isa))
        return NULL;
    const Py_ssize_t rows = product(blocks, LANES), width = product(dim4, 4);
    PyObject *result = NULL;
    if (isa == 0)
        isa = best_isa();
    if (isa < 1 || isa > best_isa()) {
        PyErr_Format(PyExc_ValueError, "path %d is not available on this CPU", isa);
        goto done;
    }
    if (check(&codes, product(rows, width), 1, "codes") || check(&rowsum, rows, 4, "rowsum") ||
        check(&coef, rows, 4, "coef") || check(&norm, rows, 4, "norm") ||
        check(&q, product(nq, width), 1, "q") || check(&qscale, nq, 4, "qscale") ||
        check(&out, product(nq, blocks), 4, "out"))
        goto done;
    Scan s = {codes.buf, rowsum.buf, coef.buf, norm.buf, q.buf, qscale.buf, out.buf,
              blocks, dim4, nq, offset};
    Py_BEGIN_ALLOW_THREADS;
#ifdef MEMNET_X86
    if (isa == 3)
        failed = minima_vnni(&s);
    else if (isa == 2)
        minima_avx2(&s);
    else
#endif
        minima_portable(&s);
    Py_END_ALLOW_THREADS;
    result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&rowsum);
    PyBuffer_Release(&coef);
    PyBuffer_Release(&norm);
    PyBuffer_Release(&q);
    PyBuffer_Release(&qscale);
    PyBuffer_Release(&out);
    return result;
}

/* Insert x into top[0..n) (ascending, at most want kept); returns the new count. */
static Py_ssize_t keep_smallest(double *top, Py_ssize_t n, Py_ssize_t want, double x)
{
    Py_ssize_t i = n < want ? n : want - 1;
    while (i > 0 && top[i - 1] > x) {
        top[i] = top[i - 1];
        i--;
    }
    top[i] = x;
    return n < want ? n + 1 : want;
}

/* The bound for a row (or a group: its largest norm and error) and a query: 2 (R e_v + E |v^|)
 * + F (memnet/quantized.py). Every operation rounds monotonically, so the bound of the smallest
 * R and E is at most, and that of the largest at least, every group's: the cheap tests below
 * never drop a pair. */
static inline double bound(double R, double E, const double *p)
{
    return 2 * (R * p[0] + E * p[1]) + p[2];
}

typedef struct {
    const float *mins;                    /* [nq, groups] */
    const double *R, *E, *extremes;       /* [groups], [groups], [4] */
    const double *rnorm, *rerr;           /* [rows] */
    const double *params;                 /* [nq, 3]: e_v, |v^|, F */
    Scan scan;                            /* codes, rows and queries, as for minima */
    Py_ssize_t want;
    int32_t *pairs;                       /* [cap, 2]: query, row */
    double *upper;                        /* [cap]: the row's upper bound */
    double *cuts;                         /* [nq]: each query's row cut */
    Py_ssize_t cap;
    BlockFn block;
    uint32_t (*below)(const float *, float, int);
} Select;

typedef struct {
    int32_t row;
    double lower, upper; /* bounds of the row's Δ */
} Cand;

/* A float at least x (x rounded up): a test against it never drops what x would keep. */
static float up_float(double x)
{
    float f = (float)x;
    return (double)f < x ? nextafterf(f, INFINITY) : f;
}

/* Bit i set where m[i] < t (or m[i] <= t with le), i < 16: the cheap first test of a pass. */
static uint32_t below_portable(const float *m, float t, int le)
{
    uint32_t mask = 0;
    for (int i = 0; i < LANES; i++)
        mask |= (uint32_t)(le ? m[i] <= t : m[i] < t) << i;
    return mask;
}

#ifdef MEMNET_X86
__attribute__((target("avx512f"))) static uint32_t below_avx512(const float *m, float t, int le)
{
    const __m512 v = _mm512_loadu_ps(m), w = _mm512_set1_ps(t);
    return le ? _mm512_cmp_ps_mask(v, w, _CMP_LE_OQ) : _mm512_cmp_ps_mask(v, w, _CMP_LT_OQ);
}
#endif

/* The want-th smallest upper bound over the groups: T >= the want-th smallest Δ. */
static double group_cut(const Select *x, const float *mins, const double *p, double *top)
{
    const double bmin = bound(x->extremes[0], x->extremes[1], p);
    Py_ssize_t n = 0;
    double T = INFINITY;
    float t = INFINITY; /* m >= t implies m + bmin >= T: the group cannot lower T */
    for (Py_ssize_t g0 = 0; g0 < x->scan.blocks; g0 += LANES) {
        for (uint32_t mask = x->below(mins + g0, t, 0); mask; mask &= mask - 1) {
            const Py_ssize_t g = g0 + __builtin_ctz(mask);
            const double m = mins[g];
            if (!(m + bmin < T))
                continue;
            const double up = m + bound(x->R[g], x->E[g], p);
            if (up < T) {
                n = keep_smallest(top, n, x->want, up);
                if (n == x->want) {
                    T = top[x->want - 1];
                    t = up_float(T - bmin);
                }
            }
        }
    }
    return T;
}

/* One query: the rows of the blocks whose lower bound is within the block cut, estimated
 * again one by one; the rows whose lower bound is within the want-th smallest row upper
 * bound (the row cut, cuts[qi]) go to pairs, with their upper bounds. Returns the new total
 * found (even beyond cap), or -1 when out of memory. */
static Py_ssize_t select_one(const Select *x, Py_ssize_t qi, double *top, Cand **buf,
                             Py_ssize_t *size, Py_ssize_t found)
{
    const float *mins = x->mins + qi * x->scan.blocks;
    const double *p = x->params + 3 * qi;
    const double bmax = bound(x->extremes[2], x->extremes[3], p);
    const double cut = group_cut(x, mins, p, top);
    const float t = up_float(cut + bmax); /* m > t implies m - bmax > cut: no row within */
    Py_ssize_t c = 0, n = 0;
    double T = INFINITY;
    for (Py_ssize_t g0 = 0; g0 < x->scan.blocks; g0 += LANES) {
        for (uint32_t mask = x->below(mins + g0, t, 1); mask; mask &= mask - 1) {
            const Py_ssize_t g = g0 + __builtin_ctz(mask);
            const double m = mins[g];
            if (m == INFINITY || !(m - bound(x->R[g], x->E[g], p) <= cut))
                continue;
            float est[LANES];
            x->block(&x->scan, g, qi, est);
            for (int l = 0; l < LANES; l++) {
                const Py_ssize_t r = g * LANES + l;
                if (est[l] == INFINITY)
                    continue;
                if (c == *size) {
                    *size = 2 * *size + 64;
                    Cand *grown = PyMem_RawRealloc(*buf, *size * sizeof(Cand));
                    if (!grown)
                        return -1;
                    *buf = grown;
                }
                const double b = bound(x->rnorm[r], x->rerr[r], p);
                (*buf)[c++] = (Cand){(int32_t)r, est[l] - b, est[l] + b};
                if (est[l] + b < T) {
                    n = keep_smallest(top, n, x->want, est[l] + b);
                    if (n == x->want)
                        T = top[x->want - 1];
                }
            }
        }
    }
    x->cuts[qi] = T;
    for (Py_ssize_t i = 0; i < c; i++) {
        const Cand *k = *buf + i;
        if (!(k->lower <= T))
            continue;
        if (found < x->cap) {
            x->pairs[2 * found] = (int32_t)qi;
            x->pairs[2 * found + 1] = k->row;
            x->upper[found] = k->upper;
        }
        found++;
    }
    return found;
}

static PyObject *py_select(PyObject *self, PyObject *args)
{
    enum { NBUF = 16 };
    Py_buffer b[NBUF];
    Py_ssize_t blocks, dim4, nq, want;
    int offset, isa;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*y*y*y*y*y*w*w*w*nnnnii", &b[0], &b[1], &b[2],
                          &b[3], &b[4], &b[5], &b[6], &b[7], &b[8], &b[9], &b[10], &b[11],
                          &b[12], &b[13], &b[14], &b[15], &blocks, &dim4, &nq, &want, &offset,
                          &isa))
        return NULL;
    const Py_ssize_t rows = product(blocks, LANES), groups = blocks, width = product(dim4, 4);
    PyObject *result = NULL;
    double *top = NULL;
    Cand *buf = NULL;
    Py_ssize_t size = 0, found = 0;
    if (want < 1 || product(want, sizeof(double)) < 0 || blocks % LANES) {
        PyErr_SetString(PyExc_ValueError,
                        "want must be at least 1 (and not huge), blocks a multiple of 16");
        goto done;
    }
    if (check(&b[0], product(nq, groups), 4, "minima") || check(&b[1], groups, 8, "R") ||
        check(&b[2], groups, 8, "E") || check(&b[3], 4, 8, "extremes") ||
        check(&b[4], rows, 8, "row_norm") || check(&b[5], rows, 8, "row_err") ||
        check(&b[6], product(nq, 3), 8, "params") ||
        check(&b[7], product(rows, width), 1, "codes") ||
        check(&b[8], rows, 4, "rowsum") || check(&b[9], rows, 4, "coef") ||
        check(&b[10], rows, 4, "norm") || check(&b[11], product(nq, width), 1, "q") ||
        check(&b[12], nq, 4, "qscale") || check(&b[13], 0, 4, "pairs") ||
        check(&b[14], b[13].len / 8, 8, "upper") || check(&b[15], nq, 8, "cuts"))
        goto done;
    Select x = {b[0].buf, b[1].buf, b[2].buf, b[3].buf, b[4].buf, b[5].buf, b[6].buf,
                {b[7].buf, b[8].buf, b[9].buf, b[10].buf, b[11].buf, b[12].buf, NULL, blocks,
                 dim4, nq, offset},
                want, b[13].buf, b[14].buf, b[15].buf, b[13].len / 8, block_portable,
                below_portable};
    if (isa == 0)
        isa = best_isa();
    if (isa < 1 || isa > best_isa()) {
        PyErr_Format(PyExc_ValueError, "path %d is not available on this CPU", isa);
        goto done;
    }
#ifdef MEMNET_X86
    if (isa == 3) {
        x.block = block_vnni;
        x.below = below_avx512;
    } else if (isa == 2) {
        x.block = block_avx2;
    }
#endif
    top = PyMem_Malloc(want * sizeof(double));
    if (!top) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t qi = 0; qi < nq && found >= 0; qi++)
        found = select_one(&x, qi, top, &buf, &size, found);
    Py_END_ALLOW_THREADS;
    result = found < 0 ? PyErr_NoMemory() : PyLong_FromSsize_t(found);
done:
    PyMem_Free(top);
    PyMem_RawFree(buf);
    for (int i = 0; i < NBUF; i++)
        PyBuffer_Release(&b[i]);
    return result;
}

/* ---- Small memories (memnet/dense.py): nearest and top-k slots, many memories at once ----
 *
 * dist(s) = np.add.reduce((a_s - v) * (a_s - v)) in float32, the bits numpy's
 * ((A - V[:, None]) ** 2).sum(axis=-1) and memnet.distance.sqdist give: each difference and
 * square rounded to float32 (no FMA: -ffp-contract=off), then numpy's pairwise sum of the M
 * squares (below), added to the reduction's identity 0. Slots rank by the int64 key
 * (int32 bits of dist) << shift | slot, an empty slot's key INT64_MAX: memnet.dense.keys,
 * the reference this is tested against (tests/test_dense.py). */

/* numpy's float32 pairwise sum of n contiguous floats (numpy/_core/src/umath/loops_utils.h):
 * under 8 in order; up to 128 with eight accumulators combined as a tree; above, two halves
 * split at a multiple of 8. */
static float pairwise(const float *a, Py_ssize_t n)
{
    Py_ssize_t i;
    if (n < 8) {
        float res = 0.f;
        for (i = 0; i < n; i++)
            res += a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++)
            r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++)
                r[j] += a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++)
            res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise(a, n2) + pairwise(a + n2, n - n2);
}

typedef struct {
    const float *A;      /* [memories, slots, dim] */
    const uint8_t *full; /* [memories, slots] filled flags */
    const int64_t *rows; /* [n] the memory of each V */
    const float *V;      /* [n, dim] */
    int64_t *out;        /* [n, k], or [n] for the nearest slot */
    Py_ssize_t n, slots, dim, k;
    int nearest;
} Rank;

/* The k smallest keys of memory rows[i] for V[i], ascending, into top (k <= slots). */
static void row_topk(const Rank *r, Py_ssize_t i, float *sq, int64_t *top, int shift)
{
    const Py_ssize_t m = r->dim, row = r->rows[i];
    const float *v = r->V + i * m;
    Py_ssize_t kept = 0;
    for (Py_ssize_t s = 0; s < r->slots; s++) {
        int64_t key = INT64_MAX;
        if (r->full[row * r->slots + s]) {
            const float *a = r->A + (row * r->slots + s) * m;
            for (Py_ssize_t j = 0; j < m; j++) {
                float d = a[j] - v[j];
                sq[j] = d * d;
            }
            float dist = 0.f + pairwise(sq, m);
            int32_t bits;
            memcpy(&bits, &dist, 4);
            key = (int64_t)((uint64_t)(int64_t)bits << shift) | s;
        }
        if (kept == r->k && top[kept - 1] <= key)
            continue;
        Py_ssize_t at = kept < r->k ? kept++ : kept - 1;
        while (at > 0 && top[at - 1] > key) {
            top[at] = top[at - 1];
            at--;
        }
        top[at] = key;
    }
}

static PyObject *py_rank(PyObject *self, PyObject *args)
{
    Py_buffer A, full, rows, V, out;
    Py_ssize_t n, memories, slots, dim, k;
    int nearest;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*nnnnni", &A, &full, &rows, &V, &out, &n, &memories,
                          &slots, &dim, &k, &nearest))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t kept = k < slots ? k : slots;
    if (slots < 1 || dim < 1 || k < 1 || slots > ((Py_ssize_t)1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "rank: need slots, dim, k >= 1 and slots <= 2**30");
        goto done;
    }
    if (check(&A, product(product(memories, slots), dim), 4, "A") ||
        check(&full, product(memories, slots), 1, "full") || check(&rows, n, 8, "rows") ||
        check(&V, product(n, dim), 4, "V") || check(&out, nearest ? n : product(n, k), 8, "out"))
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t row = ((const int64_t *)rows.buf)[i];
        if (row < 0 || row >= memories) {
            PyErr_Format(PyExc_IndexError, "rank: row %lld of %zd memories", (long long)row,
                         memories);
            goto done;
        }
    }
    int shift = 1;
    while (((Py_ssize_t)1 << shift) < slots)
        shift++;
    float *sq = PyMem_RawMalloc(dim * sizeof(float));
    int64_t *top = PyMem_RawMalloc(kept * sizeof(int64_t));
    if (!sq || !top) {
        PyMem_RawFree(sq);
        PyMem_RawFree(top);
        result = PyErr_NoMemory();
        goto done;
    }
    Rank r = {A.buf, full.buf, rows.buf, V.buf, out.buf, n, slots, dim, kept, nearest};
    const int64_t mask = ((int64_t)1 << shift) - 1;
    int64_t *o = out.buf;
    /* The GIL is kept: a call is microseconds, and rows (checked above) cannot change. */
    for (Py_ssize_t i = 0; i < n; i++) {
        row_topk(&r, i, sq, top, shift);
        if (nearest) {
            o[i] = top[0] == INT64_MAX ? -1 : (top[0] & mask);
            continue;
        }
        for (Py_ssize_t j = 0; j < k; j++)
            o[i * k + j] = j >= kept || top[j] == INT64_MAX ? -1 : (top[j] & mask);
    }
    PyMem_RawFree(sq);
    PyMem_RawFree(top);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&A);
    PyBuffer_Release(&full);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&V);
    PyBuffer_Release(&out);
    return result;
}

/* finite_f32(v, length): True if v is a C-contiguous float32 vector of `length` values, all
 * finite, whose squared norm is clearly below float32's limit (summed in double: each square
 * of a float32 is exact there; the sum is below 1e38, so float32's sum, in any order, cannot
 * reach FLT_MAX ~3.4e38). False otherwise, including near the limit: the caller's full check
 * (numpy) then decides, as it always did. memnet/vectors.py's fast path. */
static PyObject *py_finite_f32(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "finite_f32(v, length)");
        return NULL;
    }
    const Py_ssize_t length = PyLong_AsSsize_t(args[1]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear(); /* not a contiguous buffer: not the fast path's case */
        Py_RETURN_FALSE;
    }
    int ok = b.ndim == 1 && b.shape[0] == length && b.itemsize == 4 && b.format &&
             (strcmp(b.format, "f") == 0 || strcmp(b.format, "<f") == 0 ||
              strcmp(b.format, "=f") == 0);
    if (ok) {
        const float *v = b.buf;
        double sum = 0.0;
        for (Py_ssize_t i = 0; i < length; i++)
            sum += (double)v[i] * (double)v[i];
        ok = sum < 1e38; /* false for NaN and inf too */
    }
    PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

static PyObject *py_best_isa(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(best_isa());
}

static PyMethodDef methods[] = {
    {"minima", py_minima, METH_VARARGS,
     "minima(codes, rowsum, coef, norm, q, qscale, out, blocks, dim4, nq, offset, isa)"},
    {"select", py_select, METH_VARARGS,
     "select(minima, R, E, extremes, row_norm, row_err, params, codes, rowsum, coef, norm, q,\n"
     "       qscale, pairs, upper, cuts, blocks, dim4, nq, want, offset, isa)\n"
     "-> (query, row) pairs found"},
    {"rank", py_rank, METH_VARARGS,
     "rank(A, full, rows, V, out, n, memories, slots, dim, k, nearest): the nearest slot or\n"
     "the k nearest slots of memory rows[i] of A for V[i] (memnet/dense.py)"},
    {"finite_f32", (PyCFunction)(void (*)(void))py_finite_f32, METH_FASTCALL,
     "finite_f32(v, length): v is a contiguous float32 vector [length], finite, with a\n"
     "squared norm below 1e38 (False near float32's limit: check it fully then)"},
    {"best_isa", py_best_isa, METH_NOARGS,
     "The fastest path this CPU runs: 3 AVX-512 VNNI, 2 AVX2, 1 portable C."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "memnet._scan",
                                    "memnet's int8 candidate pass (see _scan.c).", -1, methods};

PyMODINIT_FUNC PyInit__scan(void)
{
    return PyModule_Create(&module);
}
