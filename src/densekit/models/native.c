/* Fused elementwise passes of the dense block on the CPU (float32), for densekit.models.native.
 *
 * Every operand is a (rows, cols) row-major matrix with its own leading dimension, so a
 * column slice of a block's channels-last feature buffer is read in place. Each function
 * does in one pass over memory what takes two to four torch ops (each a full read and
 * write of the matrix); on 2 CPU cores these passes are memory-bound. One kernel is not
 * elementwise: a DenseNet-BC layer's 3x3 convolution for inference (dk_conv3x3, below the
 * column kernels, with its own comment), and beside it the stem convolution that feeds a
 * dense block (dk_stem_conv).
 *
 * Column sums are accumulated in double, per thread, and added in thread order: the
 * result does not depend on timing, only on the thread count.
 *
 * The column kernels (BN-ReLU, gather, scatter-add, the ReLU-BN backward sums, the input
 * gradient, column statistics), the transition's pooling kernels and the ImageNet stem's
 * max-pooling kernels are compiled twice: for float32 matrices, and (names ending in _bf16)
 * for bfloat16 matrices, as a dense block, a transition and the stem hold them under bf16
 * autocast. Either way the per-column vectors are float32
 * and all arithmetic is float32; a bf16 value is the top half of a float32, and stores round
 * to nearest even. The file includes itself once for the second pass.
 *
 * Built at first use by native.py with the system C compiler and -fopenmp; the OpenMP
 * runtime is then the one PyTorch already loaded (same soname), so both share one pool.
 */
#ifndef DK_BF16
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* Below this many elements a second thread costs more than it saves. */
#define PARALLEL_MIN 32768

static int team(i64 rows, i64 cols, int threads)
{
    return rows * cols < PARALLEL_MIN || threads < 1 ? 1 : threads;
}

static void row_range(i64 rows, i64 *lo, i64 *hi)
{
    i64 t = omp_get_thread_num(), n = omp_get_num_threads();
    i64 chunk = (rows + n - 1) / n;
    *lo = t * chunk < rows ? t * chunk : rows;
    *hi = *lo + chunk < rows ? *lo + chunk : rows;
}
/* Per-thread partial sums, cols doubles per part, zeroed. */
static double *parts(int threads, i64 cols, int nparts)
{
    return calloc((size_t)threads * (size_t)nparts * (size_t)cols, sizeof(double));
}

static void reduce_parts(const double *p, int threads, i64 cols, i64 part, float *out)
{
    for (i64 j = 0; j < cols; j++) {
        double s = 0.0;
        for (int t = 0; t < threads; t++)
            s += p[(size_t)t * part + j];
        out[j] = (float)s;
    }
}

/* ReLU's backward, as torch's threshold_backward: zero where the output a <= 0 (a NaN passes). */
static inline float relu_grad(float g, float a)
{
    return a <= 0.f ? 0.f : g;
}

/* out[r, j] = x[r, idx[j]], or with scale (and shift) relu(x[r, idx[j]] * scale[j] + shift[j]):
 * the columns a pruned layer reads, gathered row by row (torch's index_select along columns
 * runs about ten times slower on these tall matrices), with its BN-ReLU in the same pass.
 *
 * With AVX-512 the output columns are cut into groups of at most 16 consecutive ones whose
 * sources lie within 32 consecutive columns (one output column always does), cut where the
 * next source would leave that window. A group is two masked loads and one two-register
 * permute per row, and the rows are taken a tile at a time and group by group within it, so
 * that a group's permutation, masks, scale and shift stay in registers across the tile.
 * Groups of 16 outputs with sources up to 32 columns apart, and the AVX-512 gather instruction
 * for the rest, took 1.3-1.5x as long (docs/performance.md#pruning). CPUs without AVX-512 take a loop
 * over 32-bit indices that the compiler turns into gather instructions. */
#if defined(__AVX512F__)
#include <immintrin.h>

typedef struct {
    i64 base;           /* first source column of the group's window */
    i64 j0;             /* first output column */
    __mmask16 lo, hi;   /* the source columns [base, base + 32) that exist, as two load masks */
    __mmask16 out;      /* the group's output columns, from j0 */
    int perm[16];       /* source column - base, for each output column */
    __mmask16 hit_lo, hit_hi; /* the window's columns that an output column reads (scatter: writes) */
    int inv_lo[16], inv_hi[16]; /* for each of them, that output column - j0 (the scatter's permutation) */
} group_t;

/* Rows per tile: a tile's source lines stay in L1 while each group reads them. */
#define GATHER_TILE 32

/* The groups of an index of cols output columns (at most cols of them; *groups says how many). */
static group_t *plan_groups(const i64 *idx, i64 cols, i64 *groups)
{
    group_t *g = calloc((size_t)cols, sizeof(group_t));
    if (!g)
        return NULL;
    i64 count = 0;
    for (i64 j0 = 0; j0 < cols; count++) {
        i64 base = idx[j0], top = idx[j0], n = 1;
        for (; n < 16 && j0 + n < cols; n++) { /* any order: the loads stay within the window */
            i64 v = idx[j0 + n], b = v < base ? v : base, t = v > top ? v : top;
            if (t - b >= 32)
                break;
            base = b, top = t;
        }
        i64 span = top - base + 1;
        group_t *gb = g + count;
        gb->base = base, gb->j0 = j0;
        gb->out = (__mmask16)((1u << n) - 1u);
        gb->lo = (__mmask16)(span >= 16 ? 0xFFFFu : (1u << span) - 1u);
        gb->hi = (__mmask16)(span > 16 ? (1u << (span - 16)) - 1u : 0u);
        for (i64 l = 0; l < n; l++) {
            int w = (int)(idx[j0 + l] - base);
            gb->perm[l] = w;
            if (w < 16)
                gb->hit_lo |= (__mmask16)(1u << w), gb->inv_lo[w] = (int)l;
            else
                gb->hit_hi |= (__mmask16)(1u << (w - 16)), gb->inv_hi[w - 16] = (int)l;
        }
        j0 += n;
    }
    *groups = count;
    return g;
}

/* relu(v * scale + shift), with the scale and shift of a group's columns */
static inline __m512 bn_relu_v(__m512 v, __m512 scale, __m512 shift)
{
    return _mm512_max_ps(_mm512_setzero_ps(), _mm512_fmadd_ps(v, scale, shift)); /* a NaN passes, as in torch.relu */
}

#endif

/* The row prefix that holds every indexed column (the largest index + 1), or -1 where an
 * index lies outside [0, limit): the gather and scatter kernels then return 2. */
static i64 columns_width(const i64 *idx, i64 n, i64 limit)
{
    i64 width = 0;
    for (i64 j = 0; j < n; j++) {
        if (idx[j] < 0 || idx[j] >= limit)
            return -1;
        width = idx[j] + 1 > width ? idx[j] + 1 : width;
    }
    return width;
}

/* A bfloat16 is the top half of a float32: loads shift it up, stores round to nearest even
 * (a NaN stays a quiet NaN). */
static inline float ld_bf16(const uint16_t *p)
{
    union { uint32_t u; float f; } v = {(uint32_t)*p << 16};
    return v.f;
}

static inline uint16_t to_bf16(float f)
{
    union { float f; uint32_t u; } v = {f};
    uint32_t nan = (v.u & 0x7fffffffu) > 0x7f800000u;
    return (uint16_t)(nan ? (v.u >> 16) | 0x40u : (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float ld_f32(const float *p) { return *p; }
static inline float to_f32(float f) { return f; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DK_GATHER_BF16_AVX512 1
/* to_bf16 on 16 lanes, each result in the low half of its 32-bit lane */
static inline __m512i bf16_lanes(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

/* to_bf16 on 16 lanes */
static inline __m256i to_bf16_x16(__m512 v)
{
    return _mm512_cvtepi32_epi16(bf16_lanes(v));
}

/* 16 bfloat16 values (masked) widened to float32 */
static inline __m512 ld_bf16_x16(__mmask16 m, const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

#endif
#if defined(__AVX512F__)
/* 16 elements (masked) of a float32 matrix, or of a bfloat16 one, as float32 lanes, and back */
static inline __m512 ld_x16(int bf16, __mmask16 m, const void *p)
{
#if defined(DK_GATHER_BF16_AVX512)
    if (bf16)
        return ld_bf16_x16(m, p);
#endif
    (void)bf16;
    return _mm512_maskz_loadu_ps(m, p);
}

static inline void st_x16(int bf16, void *p, __mmask16 m, __m512 v)
{
#if defined(DK_GATHER_BF16_AVX512)
    if (bf16) {
        _mm256_mask_storeu_epi16(p, m, to_bf16_x16(v));
        return;
    }
#endif
    (void)bf16;
    _mm512_mask_storeu_ps(p, m, v);
}

/* The same for 16 whole elements, without masks: on AMD EPYC (Zen 5) a bfloat16 BN-ReLU with a
 * masked load and store on every vector ran slower than the compiler's loop, and 2-3x faster with
 * plain ones, so full vectors take these and only a row's tail a mask. */
static inline __m512 ldu_x16(int bf16, const void *p)
{
#if defined(DK_GATHER_BF16_AVX512)
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p)), 16));
#endif
    (void)bf16;
    return _mm512_loadu_ps(p);
}

static inline void stu_x16(int bf16, void *p, __m512 v)
{
#if defined(DK_GATHER_BF16_AVX512)
    if (bf16) {
        _mm256_storeu_si256(p, to_bf16_x16(v));
        return;
    }
#endif
    (void)bf16;
    _mm512_storeu_ps(p, v);
}

/* The mask of the n < 16 first lanes */
static inline __mmask16 first_lanes(i64 n)
{
    return (__mmask16)((1u << n) - 1u);
}

/* Columns [j, j + 16) of a row of cols: all 16 lanes, or a row's tail */
static inline __mmask16 lanes_at(i64 j, i64 cols)
{
    return j + 16 <= cols ? (__mmask16)0xFFFFu : first_lanes(cols - j);
}

/* ld_x16 and st_x16, without a mask where all 16 lanes are wanted */
static inline __m512 ld_lanes(int bf16, __mmask16 m, const void *p)
{
    return m == 0xFFFFu ? ldu_x16(bf16, p) : ld_x16(bf16, m, p);
}

static inline void st_lanes(int bf16, void *p, __mmask16 m, __m512 v)
{
    if (m == 0xFFFFu)
        stu_x16(bf16, p, v);
    else
        st_x16(bf16, p, m, v);
}

static inline __m512 ld_vec(__mmask16 m, const float *p)
{
    return m == 0xFFFFu ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

/* relu(x * scale + shift) of one row of cols values into o, each rounded once to the matrix's
 * dtype: as dk_bn_relu and the 1x1 product's prologue (pointwise) form them;
 * bf16 needs AVX-512 BW and VL */
static void bn_relu_row(int bf16, const char *x, char *o, i64 cols, const float *scale, const float *shift)
{
    const i64 esize = bf16 ? 2 : 4;
    for (i64 j = 0; j < cols; j += 16) {
        __mmask16 m = lanes_at(j, cols);
        st_lanes(bf16, o + j * esize, m,
                 bn_relu_v(ld_lanes(bf16, m, x + j * esize), ld_vec(m, scale + j), ld_vec(m, shift + j)));
    }
}

/* s[l] += v[l] in float64, for the lanes of m: each column's sum gets the same additions in
 * the same order as the scalar loop's */
static inline void add_f64(double *s, __mmask16 m, __m512 v)
{
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    if (m == 0xFFFFu) {
        _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s), lo));
        _mm512_storeu_pd(s + 8, _mm512_add_pd(_mm512_loadu_pd(s + 8), hi));
        return;
    }
    __mmask8 ml = (__mmask8)m, mh = (__mmask8)(m >> 8);
    _mm512_mask_storeu_pd(s, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, s), lo));
    if (mh)
        _mm512_mask_storeu_pd(s + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, s + 8), hi));
}

/* Rows [r0, r1) of the gather into o, for float32 matrices, or bfloat16 ones (bf16, with BW and
 * VL); ldx and ldo count elements. With BN-ReLU (scale and shift given) each group is computed
 * in float32 lanes and rounded once; a bfloat16 copy without it loads the group's 32-column
 * window as 16-bit words and permutes those, bit for bit. A window that lies inside the row's
 * xcols columns loads whole, without masks (the lanes past the group's sources go unused):
 * 1.1x on the pruned make-run model's bfloat16 gathers at batch 64, float32 the same (AMD EPYC). */
static void gather_rows_avx512(int bf16, const void *x, i64 ldx, i64 xcols, const group_t *g, i64 groups, void *o,
                               i64 ldo, i64 r0, i64 r1, const float *scale, const float *shift)
{
    const i64 size = bf16 ? 2 : 4;
    for (i64 t = r0; t < r1; t += GATHER_TILE) {
        i64 te = t + GATHER_TILE < r1 ? t + GATHER_TILE : r1;
        for (const group_t *gb = g; gb < g + groups; gb++) {
            const __mmask16 m = gb->out, lo = gb->lo, hi = gb->hi;
            const int whole = gb->base + 32 <= xcols; /* the window inside the row: loaded without masks */
            const __m512i perm = _mm512_loadu_si512(gb->perm);
            const char *src = (const char *)x + gb->base * size;
            char *dst = (char *)o + gb->j0 * size;
#if defined(DK_GATHER_BF16_AVX512)
            if (bf16 && !scale) {
                const __mmask32 window = (__mmask32)lo | (__mmask32)hi << 16;
                const __m512i words = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(perm)); /* perm as 16-bit lanes */
                for (i64 r = t; r < te; r++) {
                    const char *s = src + r * ldx * size;
                    __m512i in = whole ? _mm512_loadu_si512(s) : _mm512_maskz_loadu_epi16(window, s);
                    __m512i w = _mm512_permutexvar_epi16(words, in);
                    _mm256_mask_storeu_epi16(dst + r * ldo * size, m, _mm512_castsi512_si256(w));
                }
                continue;
            }
#endif
            const __m512 sc = scale ? _mm512_maskz_loadu_ps(m, scale + gb->j0) : _mm512_setzero_ps();
            const __m512 sh = scale ? _mm512_maskz_loadu_ps(m, shift + gb->j0) : _mm512_setzero_ps();
#if defined(DK_GATHER_BF16_AVX512)
            if (bf16) { /* with BN-ReLU: the window's words permuted first, as above, then widened once */
                const __mmask32 window = (__mmask32)lo | (__mmask32)hi << 16;
                const __m512i words = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(perm));
                for (i64 r = t; r < te; r++) {
                    const char *s = src + r * ldx * size;
                    __m512i in = whole ? _mm512_loadu_si512(s) : _mm512_maskz_loadu_epi16(window, s);
                    __m256i w = _mm512_castsi512_si256(_mm512_permutexvar_epi16(words, in));
                    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
                    st_x16(1, dst + r * ldo * size, m, bn_relu_v(v, sc, sh));
                }
                continue;
            }
#endif
            const __mmask16 wlo = whole ? (__mmask16)0xFFFFu : lo, whi = whole ? (__mmask16)0xFFFFu : hi;
            for (i64 r = t; r < te; r++) {
                const char *s = src + r * ldx * size;
                __m512 v = _mm512_permutex2var_ps(ld_lanes(bf16, wlo, s), perm, ld_lanes(bf16, whi, s + 16 * size));
                st_x16(bf16, dst + r * ldo * size, m, scale ? bn_relu_v(v, sc, sh) : v);
            }
        }
    }
}

/* Rows [r0, r1) of dst[r, idx[j]] += src[r, j] by the groups of an increasing index (no column
 * twice), for float32 matrices, or bfloat16 ones (bf16, with BW and VL) summed in float32 and
 * rounded once: each group's 16 source values are permuted onto the columns of its window that
 * they add to, and only those columns are loaded and stored. lds and ldd count elements. */
static void scatter_add_rows_avx512(int bf16, const void *src, i64 lds, const group_t *g, i64 groups, void *dst,
                                    i64 ldd, i64 r0, i64 r1)
{
    const i64 size = bf16 ? 2 : 4;
    for (i64 t = r0; t < r1; t += GATHER_TILE) {
        i64 te = t + GATHER_TILE < r1 ? t + GATHER_TILE : r1;
        for (const group_t *gb = g; gb < g + groups; gb++) {
            const __mmask16 m = gb->out, hl = gb->hit_lo, hh = gb->hit_hi;
            const __m512i il = _mm512_loadu_si512(gb->inv_lo), ih = _mm512_loadu_si512(gb->inv_hi);
            for (i64 r = t; r < te; r++) {
                __m512 v = ld_x16(bf16, m, (const char *)src + (r * lds + gb->j0) * size);
                char *lo = (char *)dst + (r * ldd + gb->base) * size, *hi = lo + 16 * size;
                st_x16(bf16, lo, hl, _mm512_add_ps(ld_x16(bf16, hl, lo), _mm512_permutexvar_ps(il, v)));
                if (hh)
                    st_x16(bf16, hi, hh, _mm512_add_ps(ld_x16(bf16, hh, hi), _mm512_permutexvar_ps(ih, v)));
            }
        }
    }
}
#endif
/* A transition's BN-ReLU and 2x average pooling (the pooling comes before its 1x1
 * convolution: both are linear, so they commute, and the convolution then runs on a
 * quarter of the positions).
 *
 * Rows are positions (b, z, y, x) of an (n, d, h, w) grid, w fastest; windows are
 * kd x kh x kw (each 1 or 2) with stride equal to their size and no padding, and a last
 * odd plane, row or column falls outside every window, as in torch's avg_pool. Pooled
 * rows are the (n, d/kd, h/kh, w/kw) grid in the same order. */
typedef struct {
    i64 n, d, h, w, kd, kh, kw, pd, ph, pw;
} grid;

static grid make_grid(i64 n, i64 d, i64 h, i64 w, i64 kd, i64 kh, i64 kw)
{
    grid g = {n, d, h, w, kd, kh, kw, d / kd, h / kh, w / kw};
    return g;
}

static i64 pooled_rows(const grid *g)
{
    return g->n * g->pd * g->ph * g->pw;
}

/* The input rows of pooled row o's window, into win (at most 2 x 2 x 2); returns their count. */
static int window_rows(const grid *g, i64 o, i64 win[8])
{
    i64 ox = o % g->pw, t = o / g->pw, oy = t % g->ph;
    t /= g->ph;
    i64 oz = t % g->pd, b = t / g->pd;
    i64 r0 = ((b * g->d + oz * g->kd) * g->h + oy * g->kh) * g->w + ox * g->kw;
    int count = 0;
    for (i64 dz = 0; dz < g->kd; dz++)
        for (i64 dy = 0; dy < g->kh; dy++)
            for (i64 dx = 0; dx < g->kw; dx++)
                win[count++] = r0 + (dz * g->h + dy) * g->w + dx;
    return count;
}

/* The pooled row whose window holds input row r, or -1 where r is outside every window. */
static i64 window_of(const grid *g, i64 r)
{
    i64 x = r % g->w, t = r / g->w, y = t % g->h;
    t /= g->h;
    i64 z = t % g->d, b = t / g->d;
    x /= g->kw, y /= g->kh, z /= g->kd;
    if (x >= g->pw || y >= g->ph || z >= g->pd)
        return -1;
    return ((b * g->pd + z) * g->ph + y) * g->pw + x;
}

/* The ImageNet stem's max pooling (kernel, stride and padding per dim, no dilation, floor
 * mode, as torch's max_pool) after its BN-ReLU, on rows that are positions (b, z, y, x) of an
 * (n, d, h, w) grid, w fastest; pooled rows are the (n, od, oh, ow) grid in the same order.
 * The forward keeps, per pooled row and column, the offset of the window's maximum in the
 * whole window (z-major, then y, then x), or MAXPOOL_NONE where the maximum is not above 0
 * (the ReLU lets no gradient through): one byte where torch's max pooling keeps an int64
 * index, and backward needs neither the ReLU's output nor a second pass to find the maxima.
 * geom holds n, d, h, w, kd, kh, kw, sd, sh, sw, pd, ph, pw. */
#define MAXPOOL_NONE 255
#define MAXPOOL_WINDOW 254 /* most positions a window may have (native.py checks) */
typedef struct {
    i64 n, in[3], k[3], s[3], p[3], out[3];
} mpool;

static mpool make_mpool(const i64 *geom)
{
    mpool m;
    m.n = geom[0];
    for (int i = 0; i < 3; i++) {
        m.in[i] = geom[1 + i], m.k[i] = geom[4 + i], m.s[i] = geom[7 + i], m.p[i] = geom[10 + i];
        m.out[i] = (m.in[i] + 2 * m.p[i] - m.k[i]) / m.s[i] + 1;
    }
    return m;
}

static i64 mpool_rows(const mpool *m)
{
    return m->n * m->out[0] * m->out[1] * m->out[2];
}

/* The input rows of pooled row o's window that lie inside the grid, in window order, and
 * each one's offset in the whole window; returns their count. */
static int mpool_window(const mpool *m, i64 o, i64 *rows, int *offs)
{
    i64 ox = o % m->out[2], t = o / m->out[2], oy = t % m->out[1];
    t /= m->out[1];
    i64 oz = t % m->out[0], b = t / m->out[0];
    int count = 0;
    for (i64 dz = 0; dz < m->k[0]; dz++) {
        i64 z = oz * m->s[0] - m->p[0] + dz;
        if (z < 0 || z >= m->in[0])
            continue;
        for (i64 dy = 0; dy < m->k[1]; dy++) {
            i64 y = oy * m->s[1] - m->p[1] + dy;
            if (y < 0 || y >= m->in[1])
                continue;
            for (i64 dx = 0; dx < m->k[2]; dx++) {
                i64 x = ox * m->s[2] - m->p[2] + dx;
                if (x < 0 || x >= m->in[2])
                    continue;
                rows[count] = ((b * m->in[0] + z) * m->in[1] + y) * m->in[2] + x;
                offs[count++] = (int)((dz * m->k[1] + dy) * m->k[2] + dx);
            }
        }
    }
    return count;
}

/* The pooled indices along one dim whose windows hold input coordinate c: [*lo, *hi]. */
static void mpool_range(const mpool *m, int i, i64 c, i64 *lo, i64 *hi)
{
    i64 first = c + m->p[i] - m->k[i] + 1;
    *lo = first <= 0 ? 0 : (first + m->s[i] - 1) / m->s[i];
    *hi = (c + m->p[i]) / m->s[i];
    if (*hi > m->out[i] - 1)
        *hi = m->out[i] - 1;
}

#endif /* the helpers above: once */

/* This pass's matrix element: LD reads one as a float, TO rounds a float to one. */
#undef elem
#undef LD
#undef TO
#undef NAME
#undef POOL_SUM
#undef POOL_BF16
#ifdef DK_BF16
#define elem uint16_t
#define LD ld_bf16
#define TO to_bf16
#define NAME(f) f##_bf16
#else
#define elem float
#define LD ld_f32
#define TO to_f32
#define NAME(f) f
#endif

/* out = relu(x * scale + shift): batch norm with folded statistics, then ReLU. In bfloat16 with
 * AVX-512 (BW and VL), 16 columns at a time in float32 lanes, only each row's tail masked:
 * 1.2-2.8x as fast as the compiler's code of the loop below, which ran bfloat16 no faster than
 * float32 on half the bytes (two same-process A/Bs of the two builds on 784-50,176 rows of
 * 48-992 columns, AMD EPYC; the gain moved with the machine's state). In float32 that loop is
 * as fast as this. */
int NAME(dk_bn_relu)(const elem *x, i64 ldx, elem *out, i64 ldo, i64 rows, i64 cols,
               const float *scale, const float *shift, int threads)
{
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
#if defined(DK_BF16) && defined(DK_GATHER_BF16_AVX512)
        for (i64 r = lo; r < hi; r++)
            bn_relu_row(1, (const char *)(x + r * ldx), (char *)(out + r * ldo), cols, scale, shift);
        hi = lo; /* done: the portable loop below runs no rows */
#endif
        for (i64 r = lo; r < hi; r++) {
            const elem *xr = x + r * ldx;
            elem *o = out + r * ldo;
#pragma omp simd
            for (i64 j = 0; j < cols; j++) {
                float v = LD(xr + j) * scale[j] + shift[j];
                o[j] = TO(v < 0.f ? 0.f : v); /* NaN passes, as in torch.relu */
            }
        }
    }
    return 0;
}

int NAME(dk_gather_cols)(const elem *restrict x, i64 ldx, i64 xcols, const i64 *idx, elem *restrict out, i64 ldo,
                         i64 rows, i64 cols, const float *scale, const float *shift, int threads)
{
    i64 width = columns_width(idx, cols, xcols);
    if (width < 0)
        return 2;
    int *ix = malloc((size_t)cols * sizeof(int));
    if (!ix)
        return 1;
    for (i64 j = 0; j < cols; j++)
        ix[j] = (int)idx[j];
#if defined(__AVX512F__)
    i64 groups;
    group_t *g = plan_groups(idx, cols, &groups);
    if (!g) {
        free(ix);
        return 1;
    }
#endif
    int failed = 0;
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
#ifdef DK_BF16
#if defined(DK_GATHER_BF16_AVX512)
        gather_rows_avx512(1, x, ldx, xcols, g, groups, out, ldo, lo, hi, scale, shift);
#else
        if (!scale) { /* a plain copy of 16-bit values */
            for (i64 r = lo; r < hi; r++)
                for (i64 j = 0; j < cols; j++)
                    out[r * ldo + j] = x[r * ldx + ix[j]];
        } else {
            /* Gathering 16-bit values and converting them in one loop runs scalar (there is no
             * 16-bit gather): 12x slower than float32 on AVX-512. Each thread converts the row
             * prefix to float32 once, contiguously, gathers floats from it and rounds the result. */
            float *row = malloc((size_t)(width + cols) * sizeof(float)), *tmp = row ? row + width : NULL;
            if (!row) {
#pragma omp atomic write
                failed = 1;
                hi = lo;
            }
            for (i64 r = lo; r < hi; r++) {
                const elem *restrict xr = x + r * ldx;
#pragma omp simd
                for (i64 c = 0; c < width; c++)
                    row[c] = LD(xr + c);
#if defined(__AVX512F__)
                gather_rows_avx512(0, row, 0, width, g, groups, tmp, 0, 0, 1, scale, shift);
#else
                for (i64 j = 0; j < cols; j++) {
                    float v = row[ix[j]] * scale[j] + shift[j];
                    tmp[j] = v < 0.f ? 0.f : v;
                }
#endif
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    out[r * ldo + j] = TO(tmp[j]);
            }
            free(row);
        }
#endif
#elif defined(__AVX512F__)
        gather_rows_avx512(0, x, ldx, xcols, g, groups, out, ldo, lo, hi, scale, shift);
#else
        for (i64 r = lo; r < hi; r++) {
            const elem *restrict xr = x + r * ldx;
            elem *restrict o = out + r * ldo;
            if (scale) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float v = LD(xr + ix[j]) * scale[j] + shift[j];
                    o[j] = TO(v < 0.f ? 0.f : v);
                }
            } else {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    o[j] = xr[ix[j]];
            }
        }
#endif
    }
#if defined(__AVX512F__)
    free(g);
#endif
    free(ix);
    return failed;
}

/* dst[r, idx[j]] += src[r, j]: the gradient of dk_gather_cols, for increasing idx (no column twice).
 * With AVX-512 (and BW and VL for bfloat16) by the gather's groups (scatter_add_rows_avx512):
 * 2.6x as fast as the loop below in float32 and 2.7x in bfloat16 on 25,088 x 48 -> 96 (AMD
 * EPYC), with the same sums, each rounded once. */
int NAME(dk_scatter_add_cols)(const elem *src, i64 lds, const i64 *idx, elem *dst, i64 ldd, i64 dcols, i64 rows,
                              i64 cols, int threads)
{
    i64 width = columns_width(idx, cols, dcols);
    if (width < 0)
        return 2;
#if defined(__AVX512F__) && (!defined(DK_BF16) || defined(DK_GATHER_BF16_AVX512))
    i64 groups;
    group_t *g = plan_groups(idx, cols, &groups);
    if (!g)
        return 1;
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
#ifdef DK_BF16
        scatter_add_rows_avx512(1, src, lds, g, groups, dst, ldd, lo, hi);
#else
        scatter_add_rows_avx512(0, src, lds, g, groups, dst, ldd, lo, hi);
#endif
    }
    free(g);
    return 0;
#endif
    int failed = 0;
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
#ifdef DK_BF16
        /* as in dk_gather_cols: 16-bit loads and stores at scattered columns run scalar, twice
         * as slow as float32; each thread widens the row prefix to float32, adds there and
         * rounds the prefix back (a column no index names comes back unchanged) */
        float *row = malloc((size_t)width * sizeof(float));
        if (!row) {
#pragma omp atomic write
            failed = 1;
            hi = lo;
        }
#endif
        for (i64 r = lo; r < hi; r++) {
            const elem *s = src + r * lds;
            elem *d = dst + r * ldd;
#ifdef DK_BF16
#pragma omp simd
            for (i64 c = 0; c < width; c++)
                row[c] = LD(d + c);
            for (i64 j = 0; j < cols; j++)
                row[idx[j]] += LD(s + j);
#pragma omp simd
            for (i64 c = 0; c < width; c++)
                d[c] = TO(row[c]);
#else
            for (i64 j = 0; j < cols; j++)
                d[idx[j]] = TO(LD(d + idx[j]) + LD(s + j));
#endif
        }
#ifdef DK_BF16
        free(row);
#endif
    }
    return failed;
}

/* The backward of ReLU and batch norm's sums, in one pass. With d = (a <= 0 ? 0 : g), or where a
 * is NULL d = (x * ascale[j] + ashift[j] <= 0 ? 0 : g), the BN-ReLU's input (x is then needed,
 * and a bfloat16 build with AVX-512 BW and VL: else 2 is returned):
 *   sum_d[j]  = sum_r d,
 *   sum_dx[j] = sum_r d * (x - mean[j])         when x is given,
 *   dout      = d                               when dout is given (may be g itself),
 *   acc       = src + d * k[j]                  when acc is given (src NULL: acc itself).
 * Returns -1 when out of memory, else 0. */
int NAME(dk_relu_bn_sums)(const elem *g, i64 ldg, const elem *a, i64 lda, i64 rows, i64 cols,
                          elem *dout, i64 lddo, const elem *x, i64 ldx, const float *mean,
                          elem *acc, i64 ldacc, const elem *src, i64 ldsrc, const float *k, float *sum_d,
                          float *sum_dx, const float *ascale, const float *ashift, int threads)
{
#if !(defined(DK_BF16) && defined(DK_GATHER_BF16_AVX512))
    if (!a)
        return 2;
#endif
    if (!a && !(x && ascale && ashift))
        return 2;
    if (!src) /* acc += d * k in place */
        src = acc, ldsrc = ldacc;
    int n = team(rows, cols, threads);
    double *p = parts(n, cols, 2);
    if (!p)
        return -1;
#pragma omp parallel num_threads(n)
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
        double *ps = p + (size_t)omp_get_thread_num() * 2 * cols, *px = ps + cols;
#if defined(DK_BF16) && defined(DK_GATHER_BF16_AVX512)
        /* bfloat16 with AVX-512, 16 columns at a time as in dk_bn_relu: 1.03-3.7x as fast as the
         * loops below on 784-200,704 rows (two same-process A/Bs, AMD EPYC); float32 runs as fast
         * in them */
        const int bf16 = 1;
        for (i64 r = lo; r < hi; r++) {
            const elem *gr = g + r * ldg, *ar = a ? a + r * lda : 0;
            const elem *xr = x ? x + r * ldx : 0;
            elem *cr = acc ? acc + r * ldacc : 0, *dr = dout ? dout + r * lddo : 0;
            const elem *sr = acc ? src + r * ldsrc : 0;
            for (i64 j = 0; j < cols; j += 16) {
                __mmask16 m = lanes_at(j, cols);
                /* relu_grad: g where a > 0 or a is a NaN; without a, where x * scale + shift is (the
                 * same but for values under bf16's least denormal, which a rounds to zero) */
                __m512 av = ar ? ld_lanes(bf16, m, ar + j)
                               : _mm512_fmadd_ps(ld_lanes(bf16, m, xr + j), ld_vec(m, ascale + j), ld_vec(m, ashift + j));
                __mmask16 on = _mm512_cmp_ps_mask(av, _mm512_setzero_ps(), _CMP_NLE_UQ);
                __m512 d = _mm512_maskz_mov_ps(on, ld_lanes(bf16, m, gr + j));
                add_f64(ps + j, m, d);
                if (xr)
                    add_f64(px + j, m, _mm512_mul_ps(d, _mm512_sub_ps(ld_lanes(bf16, m, xr + j), ld_vec(m, mean + j))));
                if (cr)
                    st_lanes(bf16, cr + j, m, _mm512_fmadd_ps(d, ld_vec(m, k + j), ld_lanes(bf16, m, sr + j)));
                if (dr)
                    st_lanes(bf16, dr + j, m, d);
            }
        }
        hi = lo; /* done: the portable loop below runs no rows */
#endif
        for (i64 r = lo; r < hi; r++) {
            const elem *gr = g + r * ldg, *ar = a + r * lda;
            const elem *xr = x ? x + r * ldx : 0;
            elem *cr = acc ? acc + r * ldacc : 0, *dr = dout ? dout + r * lddo : 0;
            const elem *sr = acc ? src + r * ldsrc : 0;
            /* one loop per case: a branch inside would keep the loop from vectorizing */
            if (xr && cr) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float d = relu_grad(LD(gr + j), LD(ar + j));
                    ps[j] += d;
                    px[j] += d * (LD(xr + j) - mean[j]);
                    cr[j] = TO(LD(sr + j) + d * k[j]);
                }
            } else if (xr) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float d = relu_grad(LD(gr + j), LD(ar + j));
                    ps[j] += d;
                    px[j] += d * (LD(xr + j) - mean[j]);
                }
            } else if (cr) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float d = relu_grad(LD(gr + j), LD(ar + j));
                    ps[j] += d;
                    cr[j] = TO(LD(sr + j) + d * k[j]);
                }
            } else {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    ps[j] += relu_grad(LD(gr + j), LD(ar + j));
            }
            if (dr) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    dr[j] = TO(relu_grad(LD(gr + j), LD(ar + j)));
            }
        }
    }
    reduce_parts(p, n, cols, 2 * cols, sum_d);
    if (x)
        reduce_parts(p + cols, n, cols, 2 * cols, sum_dx);
    free(p);
    return 0;
}

/* The rest of batch norm's input gradient, into out (grad itself, or another matrix):
 *   out = grad * k[j] + (x - mean[j]) * b[j] + c[j]
 * with k = 1 when k is NULL. */
int NAME(dk_bn_grad_apply)(const elem *grad, i64 ldgrad, const elem *x, i64 ldx, elem *out, i64 ldout, i64 rows,
                           i64 cols, const float *k, const float *mean, const float *b, const float *c, int threads)
{
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
#if defined(DK_BF16) && defined(DK_GATHER_BF16_AVX512)
        const int bf16 = 1; /* as in dk_relu_bn_sums: float32 runs as fast in the loops below */
        for (i64 r = lo; r < hi; r++) {
            const elem *gr = grad + r * ldgrad;
            const elem *xr = x + r * ldx;
            elem *outr = out + r * ldout;
            for (i64 j = 0; j < cols; j += 16) {
                __mmask16 m = lanes_at(j, cols);
                __m512 rest = _mm512_fmadd_ps(_mm512_sub_ps(ld_lanes(bf16, m, xr + j), ld_vec(m, mean + j)),
                                              ld_vec(m, b + j), ld_vec(m, c + j));
                __m512 gv = ld_lanes(bf16, m, gr + j);
                st_lanes(bf16, outr + j, m, k ? _mm512_fmadd_ps(gv, ld_vec(m, k + j), rest) : _mm512_add_ps(gv, rest));
            }
        }
        hi = lo; /* done: the portable loop below runs no rows */
#endif
        for (i64 r = lo; r < hi; r++) {
            const elem *gr = grad + r * ldgrad;
            const elem *xr = x + r * ldx;
            elem *outr = out + r * ldout;
            if (k) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    outr[j] = TO(LD(gr + j) * k[j] + ((LD(xr + j) - mean[j]) * b[j] + c[j]));
            } else {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    outr[j] = TO(LD(gr + j) + ((LD(xr + j) - mean[j]) * b[j] + c[j]));
            }
        }
    }
    return 0;
}

#ifndef DK_BF16
/* Rows of a dense (ldx == cols) matrix summed m at a time as one row of m * cols values, so
 * that the vectorized loops over a row's values are long: the largest power of two m with
 * m * cols <= STATS_WIDTH that divides rows (1: none). A dense block's k new channels (12
 * on BC models) came in rows of 12 values, which the loops over columns ran nearly scalar:
 * on 50,176 x 12 bfloat16 values, 374 us against 113 us as rows of 384 (AMD EPYC, 2 threads). */
#define STATS_WIDTH 384
static i64 stats_fold(i64 rows, i64 cols, i64 ldx)
{
    i64 m = 1;
    if (ldx != cols)
        return 1;
    while (2 * m * cols <= STATS_WIDTH && rows % (2 * m) == 0)
        m *= 2;
    return m;
}
#endif

/* Column mean and biased variance, two passes (no E[x^2] - E[x]^2 cancellation). A dense
 * narrow matrix is read as rows of m times its columns (stats_fold); the m partial sums of
 * each column are added in double before the division, and the second pass subtracts the
 * column's mean from each of its m copies. */
int NAME(dk_col_stats)(const elem *x, i64 ldx, i64 rows, i64 cols, float *mean, float *var, int threads)
{
    i64 m = stats_fold(rows, cols, ldx);
    i64 width = m * cols, wrows = rows / m, ld = m > 1 ? width : ldx;
    int n = team(rows, cols, threads);
    double *p = parts(n, width, 1);
    float *mf = malloc((size_t)width * sizeof(float));
    if (!p || !mf) {
        free(p), free(mf);
        return -1;
    }
#pragma omp parallel num_threads(n)
    {
        i64 lo, hi;
        row_range(wrows, &lo, &hi);
        double *ps = p + (size_t)omp_get_thread_num() * width;
        for (i64 r = lo; r < hi; r++) {
            const elem *xr = x + r * ld;
#pragma omp simd
            for (i64 j = 0; j < width; j++)
                ps[j] += LD(xr + j);
        }
#pragma omp barrier
#pragma omp single
        {
            for (i64 j = 0; j < cols; j++) {
                double s = 0.0;
                for (int t = 0; t < n; t++)
                    for (i64 g = 0; g < m; g++)
                        s += p[(size_t)t * width + g * cols + j];
                mf[j] = (float)(s / (double)rows);
            }
            for (i64 j = cols; j < width; j++)
                mf[j] = mf[j % cols];
            for (i64 j = 0; j < (i64)n * width; j++)
                p[j] = 0.0;
        }
        /* the implied barrier of single: every thread sees the mean and zeroed parts */
        for (i64 r = lo; r < hi; r++) {
            const elem *xr = x + r * ld;
#pragma omp simd
            for (i64 j = 0; j < width; j++) {
                float dv = LD(xr + j) - mf[j];
                ps[j] += dv * dv;
            }
        }
    }
    for (i64 j = 0; j < cols; j++) {
        double s = 0.0;
        for (int t = 0; t < n; t++)
            for (i64 g = 0; g < m; g++)
                s += p[(size_t)t * width + g * cols + j];
        mean[j] = mf[j];
        var[j] = (float)(s / (double)rows);
    }
    free(p), free(mf);
    return 0;
}

#if defined(__AVX512F__) && (!defined(DK_BF16) || defined(DK_GATHER_BF16_AVX512))
/* BN-ReLU of n window rows (4 or 8), summed in order in float32 lanes, 16 columns at a time
 * and only a row's tail masked: the loop below vectorizes whole vectors but leaves a tail that
 * is not a multiple of 16 to scalar code, which in bfloat16 made 56 and 104 columns (a pruned
 * block's outputs) take 2.4x and 2.1x the time of 64 and 96 (149 against 61 us on 12,544 rows;
 * AMD EPYC Zen 5, 2 threads, ad hoc). The sums are the same, in the same order. */
#define POOL_SUM(n)                                                                          \
    do {                                                                                     \
        const elem *restrict r_[8];                                                         \
        for (int t_ = 0; t_ < (n); t_++)                                                     \
            r_[t_] = x + win[t_] * ldx;                                                      \
        for (i64 j = 0; j < cols; j += 16) {                                                 \
            const __mmask16 m_ = lanes_at(j, cols);                                          \
            const __m512 sc = ld_vec(m_, scale + j), sh = ld_vec(m_, shift + j);             \
            __m512 sum_ = _mm512_setzero_ps();                                               \
            _Pragma("GCC unroll 8") for (int t_ = 0; t_ < (n); t_++)                         \
                sum_ = _mm512_add_ps(sum_, bn_relu_v(ld_lanes(POOL_BF16, m_, r_[t_] + j), sc, sh)); \
            st_lanes(POOL_BF16, orow + j, m_, _mm512_mul_ps(sum_, _mm512_set1_ps(inv)));     \
        }                                                                                    \
    } while (0)
#ifdef DK_BF16
#define POOL_BF16 1
#else
#define POOL_BF16 0
#endif
#else
/* BN-ReLU of n window rows (4 or 8), summed in order in registers, one output column at a time. */
#define POOL_SUM(n)                                                                          \
    do {                                                                                     \
        const elem *restrict r_[8];                                                         \
        for (int t_ = 0; t_ < (n); t_++)                                                     \
            r_[t_] = x + win[t_] * ldx;                                                      \
        _Pragma("omp simd") for (i64 j = 0; j < cols; j++)                                   \
        {                                                                                    \
            float sc = scale[j], sh = shift[j], sum_ = 0.f;                                  \
            _Pragma("GCC unroll 8") for (int t_ = 0; t_ < (n); t_++)                         \
            {                                                                                \
                float v = LD(r_[t_] + j) * sc + sh;                                          \
                sum_ += v < 0.f ? 0.f : v;                                                   \
            }                                                                                \
            orow[j] = TO(sum_ * inv);                                                        \
        }                                                                                    \
    } while (0)
#endif

/* out = avg_pool(relu(x * scale + shift)), out being the pooled rows. For the 2x2 and 2x2x2
 * windows of a transition each output column is summed over its window in a register (the
 * window's length a constant, so the loop over it unrolls) and stored once; with the sums in
 * a per-thread array, loaded and stored at every window row, as the other sizes still go,
 * this took 2.4x the time of a BN-ReLU over the same input in float32 and 4.5x in bfloat16
 * (212 and 397 us against 88 us on 12,544 x 96 rows pooled to 3,136; 73 and 114 us in
 * registers; AMD EPYC Zen 4, 2 threads, ad hoc). The sums are in the same order either way. */
int NAME(dk_bn_relu_pool)(const elem *x, i64 ldx, elem *out, i64 ldo, i64 n, i64 d, i64 h, i64 w,
                    i64 kd, i64 kh, i64 kw, i64 cols, const float *scale, const float *shift, int threads)
{
    grid g = make_grid(n, d, h, w, kd, kh, kw);
    i64 orows = pooled_rows(&g);
    float inv = 1.f / (float)(kd * kh * kw);
    int failed = 0;
#pragma omp parallel num_threads(team(n * d * h * w, cols, threads))
    {
        i64 lo, hi;
        row_range(orows, &lo, &hi);
        float *acc = malloc((size_t)cols * sizeof(float)); /* this thread's window sums */
        if (!acc) {
#pragma omp atomic write
            failed = 1;
            lo = hi;
        }
        for (i64 o = lo; o < hi; o++) {
            elem *restrict orow = out + o * ldo;
            i64 win[8];
            int count = window_rows(&g, o, win);
            if (count == 4) {
                POOL_SUM(4);
                continue;
            }
            if (count == 8) {
                POOL_SUM(8);
                continue;
            }
#pragma omp simd
            for (i64 j = 0; j < cols; j++)
                acc[j] = 0.f;
            for (int t = 0; t < count; t++) {
                const elem *xr = x + win[t] * ldx;
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float v = LD(xr + j) * scale[j] + shift[j];
                    acc[j] += v < 0.f ? 0.f : v;
                }
            }
#pragma omp simd
            for (i64 j = 0; j < cols; j++)
                orow[j] = TO(acc[j] * inv); /* the window's sum in float, rounded once */
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

/* The backward of dk_bn_relu_pool's pooling and ReLU, summed for batch norm. With g the
 * gradient of the pooled rows and, for input row r in pooled row o's window,
 * d = g[o] / (kd*kh*kw) where x * scale + shift > 0, else 0 (and d = 0 outside every window):
 *   sum_d[j] = sum_r d,   sum_dx[j] = sum_r d * (x - mean[j]).
 * Returns -1 when out of memory, else 0. */
int NAME(dk_unpool_relu_bn_sums)(const elem *g, i64 ldg, const elem *x, i64 ldx, i64 n, i64 d, i64 h, i64 w,
                           i64 kd, i64 kh, i64 kw, i64 cols, const float *scale, const float *shift,
                           const float *mean, float *sum_d, float *sum_dx, int threads)
{
    grid gr = make_grid(n, d, h, w, kd, kh, kw);
    i64 orows = pooled_rows(&gr);
    float inv = 1.f / (float)(kd * kh * kw);
    int nt = team(n * d * h * w, cols, threads);
    double *p = parts(nt, cols, 2);
    if (!p)
        return -1;
#pragma omp parallel num_threads(nt)
    {
        i64 lo, hi;
        row_range(orows, &lo, &hi);
        double *ps = p + (size_t)omp_get_thread_num() * 2 * cols, *px = ps + cols;
#if defined(DK_BF16) && defined(DK_GATHER_BF16_AVX512)
        /* bfloat16 with AVX-512, 16 columns at a time as in dk_relu_bn_sums: the loop below ran
         * BC-100's first transition (50,176 x 216 rows under 12,544 pooled ones) at 2.7 ms in
         * bf16 against 1.1 ms for the forward pool (AMD EPYC Zen 4, ad hoc). Same sums, in the
         * same order. Under 16 columns, where every vector would be masked, the loop below
         * stays (5 columns: 1.2-1.7x slower this way). */
        const int bf16 = 1;
        for (i64 o = lo; o < (cols >= 16 ? hi : lo); o++) {
            const elem *grow = g + o * ldg;
            i64 win[8];
            int count = window_rows(&gr, o, win);
            for (int t = 0; t < count; t++) {
                const elem *xr = x + win[t] * ldx;
                for (i64 j = 0; j < cols; j += 16) {
                    __mmask16 m = lanes_at(j, cols);
                    __m512 xv = ld_lanes(bf16, m, xr + j);
                    __m512 a = _mm512_fmadd_ps(xv, ld_vec(m, scale + j), ld_vec(m, shift + j));
                    /* relu_grad: the gradient where a > 0 or a is a NaN */
                    __mmask16 on = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_NLE_UQ);
                    __m512 dv = _mm512_maskz_mov_ps(on, _mm512_mul_ps(ld_lanes(bf16, m, grow + j), _mm512_set1_ps(inv)));
                    add_f64(ps + j, m, dv);
                    add_f64(px + j, m, _mm512_mul_ps(dv, _mm512_sub_ps(xv, ld_vec(m, mean + j))));
                }
            }
        }
        if (cols >= 16)
            hi = lo; /* done: the portable loop below runs no rows */
#endif
        for (i64 o = lo; o < hi; o++) {
            const elem *grow = g + o * ldg;
            i64 win[8];
            int count = window_rows(&gr, o, win);
            for (int t = 0; t < count; t++) {
                const elem *xr = x + win[t] * ldx;
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float xv = LD(xr + j);
                    float dv = relu_grad(LD(grow + j) * inv, xv * scale[j] + shift[j]);
                    ps[j] += dv;
                    px[j] += dv * (xv - mean[j]);
                }
            }
        }
    }
    reduce_parts(p, nt, cols, 2 * cols, sum_d);
    reduce_parts(p + cols, nt, cols, 2 * cols, sum_dx);
    free(p);
    return 0;
}

/* Batch norm's input gradient behind dk_bn_relu_pool, into out (input rows), with d as in
 * dk_unpool_relu_bn_sums:
 *   out = d * k[j] + (x - mean[j]) * b[j] + c[j],   or d * k[j] when b is NULL (eval mode). */
int NAME(dk_unpool_bn_grad)(const elem *g, i64 ldg, const elem *x, i64 ldx, i64 n, i64 d, i64 h, i64 w,
                      i64 kd, i64 kh, i64 kw, i64 cols, const float *scale, const float *shift,
                      const float *k, const float *mean, const float *b, const float *c,
                      elem *out, i64 ldo, int threads)
{
    grid gr = make_grid(n, d, h, w, kd, kh, kw);
    i64 rows = n * d * h * w;
    float inv = 1.f / (float)(kd * kh * kw);
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
        for (i64 r = lo; r < hi; r++) {
            const elem *xr = x + r * ldx;
            elem *orow = out + r * ldo;
            i64 o = window_of(&gr, r);
            if (o < 0 && b) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    orow[j] = TO((LD(xr + j) - mean[j]) * b[j] + c[j]);
            } else if (o < 0) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    orow[j] = TO(0.f);
            } else if (b) {
                const elem *grow = g + o * ldg;
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float xv = LD(xr + j);
                    float dv = relu_grad(LD(grow + j) * inv, xv * scale[j] + shift[j]);
                    orow[j] = TO(dv * k[j] + ((xv - mean[j]) * b[j] + c[j]));
                }
            } else {
                const elem *grow = g + o * ldg;
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    orow[j] = TO(relu_grad(LD(grow + j) * inv, LD(xr + j) * scale[j] + shift[j]) * k[j]);
            }
        }
    }
    return 0;
}

/* out = max_pool(relu(x * scale + shift)) (relu(x) where scale is NULL), the maximum of each
 * window taken as torch's max pooling takes it: the first largest value in window order, a
 * NaN over any number (values compared in float32, before the rounding to bf16). With arg, each maximum's offset in its window, or MAXPOOL_NONE where
 * it is not above 0 (and not NaN). Values are rounded once, after the maximum (rounding is
 * monotonic: the same as the maximum of the rounded values). Returns -1 when out of memory. */
int NAME(dk_relu_maxpool)(const elem *x, i64 ldx, const i64 *geom, i64 cols, const float *scale,
                    const float *shift, elem *out, i64 ldo, uint8_t *arg, int threads)
{
    mpool m = make_mpool(geom);
    i64 orows = mpool_rows(&m);
    int failed = 0;
#pragma omp parallel num_threads(team(orows * 4, cols, threads))
    {
        i64 lo, hi, win[MAXPOOL_WINDOW];
        int offs[MAXPOOL_WINDOW];
        row_range(orows, &lo, &hi);
        /* this thread's window maxima and their offsets (as floats: one vector width in the
         * loop); without scale and shift, 1 and 0 (exact: the same loop either way) */
        float *best = malloc((size_t)cols * 4 * sizeof(float)), *at = best + cols, *sc = at + cols, *sh = sc + cols;
        if (!best) {
#pragma omp atomic write
            failed = 1;
            lo = hi;
        } else {
            for (i64 j = 0; j < cols; j++)
                sc[j] = scale ? scale[j] : 1.f, sh[j] = scale ? shift[j] : 0.f;
        }
        for (i64 o = lo; o < hi; o++) {
            int count = mpool_window(&m, o, win, offs);
#pragma omp simd
            for (i64 j = 0; j < cols; j++)
                best[j] = -1.f, at[j] = 0.f; /* below any ReLU output: the first position takes it */
            for (int t = 0; t < count; t++) {
                const elem *xr = x + win[t] * ldx;
                float off = (float)offs[t];
#pragma omp simd
                for (i64 j = 0; j < cols; j++) {
                    float v = LD(xr + j) * sc[j] + sh[j];
                    v = v < 0.f ? 0.f : v;
                    /* a larger value or a NaN takes the window (two selects: GCC vectorizes
                     * these, not one on the two conditions) */
                    float b = v > best[j] ? v : best[j], a = v > best[j] ? off : at[j];
                    best[j] = v != v ? v : b;
                    at[j] = v != v ? off : a;
                }
            }
            elem *orow = out + o * ldo;
#pragma omp simd
            for (i64 j = 0; j < cols; j++)
                orow[j] = TO(best[j]);
            if (arg) {
                uint8_t *ar = arg + o * cols;
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    ar[j] = (best[j] > 0.f) | (best[j] != best[j]) ? (uint8_t)at[j] : MAXPOOL_NONE;
            }
        }
        free(best);
    }
    return failed ? -1 : 0;
}

/* The backward of dk_relu_maxpool up to batch norm, from its arg: with d the gradient g of
 * each pooled row at its maximum's input row (summed where windows overlap),
 *   sum_d[j] = sum d,   sum_dx[j] = sum d * (x - mean[j]) over the input rows.
 * Returns -1 when out of memory. */
int NAME(dk_maxpool_bn_sums)(const elem *g, i64 ldg, const uint8_t *arg, const elem *x, i64 ldx, const i64 *geom,
                       i64 cols, const float *mean, float *sum_d, float *sum_dx, int threads)
{
    mpool m = make_mpool(geom);
    i64 orows = mpool_rows(&m);
    int nt = team(orows * 4, cols, threads);
    double *p = parts(nt, cols, 2);
    if (!p)
        return -1;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        i64 lo, hi, win[MAXPOOL_WINDOW];
        int offs[MAXPOOL_WINDOW];
        row_range(orows, &lo, &hi);
        double *ps = p + (size_t)omp_get_thread_num() * 2 * cols, *px = ps + cols;
        /* x at each column's maximum, and the offsets as floats (one vector width in the loops) */
        float *xat = malloc((size_t)cols * 2 * sizeof(float)), *af = xat + cols;
        if (!xat) {
#pragma omp atomic write
            failed = 1;
            lo = hi;
        }
        for (i64 o = lo; o < hi; o++) {
            const elem *grow = g + o * ldg;
            const uint8_t *ar = arg + o * cols;
            int count = mpool_window(&m, o, win, offs);
#pragma omp simd
            for (i64 j = 0; j < cols; j++)
                xat[j] = 0.f, af[j] = (float)ar[j];
            for (int t = 0; t < count; t++) {
                const elem *xr = x + win[t] * ldx;
                float off = (float)offs[t];
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    xat[j] = af[j] == off ? LD(xr + j) : xat[j];
            }
#pragma omp simd
            for (i64 j = 0; j < cols; j++) {
                float dv = af[j] != (float)MAXPOOL_NONE ? LD(grow + j) : 0.f;
                ps[j] += dv;
                px[j] += dv * (xat[j] - mean[j]);
            }
        }
        free(xat);
    }
    if (!failed) {
        reduce_parts(p, nt, cols, 2 * cols, sum_d);
        reduce_parts(p + cols, nt, cols, 2 * cols, sum_dx);
    }
    free(p);
    return failed ? -1 : 0;
}

/* Batch norm's input gradient behind dk_relu_maxpool, into out (input rows), with d as in
 * dk_maxpool_bn_sums (summed in float over the windows that hold the row):
 *   out = d * k[j] + (x - mean[j]) * b[j] + c[j],   or d * k[j] when b is NULL (eval mode).
 * Returns -1 when out of memory. */
int NAME(dk_unmaxpool_bn_grad)(const elem *g, i64 ldg, const uint8_t *arg, const elem *x, i64 ldx,
                         const i64 *geom, i64 cols, const float *k, const float *mean, const float *b,
                         const float *c, elem *out, i64 ldo, int threads)
{
    mpool m = make_mpool(geom);
    i64 rows = m.n * m.in[0] * m.in[1] * m.in[2];
    int failed = 0;
#pragma omp parallel num_threads(team(rows, cols, threads))
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
        float *acc = malloc((size_t)cols * sizeof(float));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
            lo = hi;
        }
        for (i64 r = lo; r < hi; r++) {
            i64 cx = r % m.in[2], t = r / m.in[2], cy = t % m.in[1];
            t /= m.in[1];
            i64 cz = t % m.in[0], bi = t / m.in[0];
            i64 zlo, zhi, ylo, yhi, xlo, xhi;
            mpool_range(&m, 0, cz, &zlo, &zhi);
            mpool_range(&m, 1, cy, &ylo, &yhi);
            mpool_range(&m, 2, cx, &xlo, &xhi);
#pragma omp simd
            for (i64 j = 0; j < cols; j++)
                acc[j] = 0.f;
            for (i64 oz = zlo; oz <= zhi; oz++)
                for (i64 oy = ylo; oy <= yhi; oy++)
                    for (i64 ox = xlo; ox <= xhi; ox++) {
                        i64 o = ((bi * m.out[0] + oz) * m.out[1] + oy) * m.out[2] + ox;
                        uint8_t off = (uint8_t)((((cz - (oz * m.s[0] - m.p[0])) * m.k[1]
                                                  + (cy - (oy * m.s[1] - m.p[1]))) * m.k[2])
                                                + (cx - (ox * m.s[2] - m.p[2])));
                        const elem *grow = g + o * ldg;
                        const uint8_t *ar = arg + o * cols;
#pragma omp simd
                        for (i64 j = 0; j < cols; j++)
                            acc[j] += ar[j] == off ? LD(grow + j) : 0.f;
                    }
            const elem *xr = x + r * ldx;
            elem *orow = out + r * ldo;
            if (b) {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    orow[j] = TO(acc[j] * k[j] + ((LD(xr + j) - mean[j]) * b[j] + c[j]));
            } else {
#pragma omp simd
                for (i64 j = 0; j < cols; j++)
                    orow[j] = TO(acc[j] * k[j]);
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

#ifndef DK_BF16
/* A dense layer's last convolution: 2D, 3x3, stride 1, padding 1, at most 16 output channels
 * (a DenseNet-BC layer's growth rate), from a channels-last (N*H*W, cin) matrix into a
 * (N*H*W, cout) one, each with its own leading dimension, so the output is written straight
 * into the block's feature buffer. oneDNN's convolution spends about 250 us of a 14x14 batch of
 * 64 on anything but multiplying (even with one input channel), then the output is copied into
 * the buffer: with few input channels, as in a pruned layer, that is most of its time
 * (docs/performance.md#pruning has the figures).
 *
 * Each thread takes pairs of output rows (an image's rows y and y + 1), cut into blocks of at
 * most CONV_PIXELS pixels; a block keeps one 16-lane accumulator per pixel of each row (its
 * output channels) in registers. For each of the four input rows the pair reads, each
 * horizontal tap and each input channel (bf16: pair of channels), it loads the tap's weights
 * for the rows that use that input row, broadcasts each pixel's input value once and adds it
 * times the weights to one or both rows' accumulators. A block that holds a row's first or
 * last pixel leaves out the taps that would read the padding; input rows off the image are
 * left out. The weights are packed by native.py: float32 as (9, cin, 16), bfloat16 as (9, cin/2
 * rounded up, 16, 2) pairs of input channels for the AVX512-BF16 dot product, zero where there
 * is no channel. Sums are float32, each output's taps added in a fixed order: the result does
 * not depend on the thread count. bf16 outputs are rounded to nearest even, as oneDNN's bf16
 * convolution rounds them. */
#define CONV_PIXELS 14

#if defined(__AVX512F__)
#define CONV_F32 1
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CONV_BF16 2
#else
#define CONV_BF16 0
#endif

/* The input value(s) of input step c at src, broadcast: a float32 channel, a bf16 pair of
 * channels, or with single a bf16 input's last channel alone, zero-extended (a pair whose other
 * half is zero), so that an odd channel count is not read past. */
static inline __m512 conv_bcast(const int bf16, const int single, const void *src, i64 c)
{
    if (!bf16)
        return _mm512_set1_ps(((const float *)src)[c]);
    if (single)
        return _mm512_castsi512_ps(_mm512_set1_epi32(((const uint16_t *)src)[2 * c]));
    int32_t v;
    memcpy(&v, (const uint16_t *)src + 2 * c, sizeof v);
    return _mm512_castsi512_ps(_mm512_set1_epi32(v));
}

static inline __m512 conv_madd(const int bf16, __m512 acc, __m512 v, __m512 w)
{
#if CONV_BF16
    if (bf16)
        return _mm512_dpbf16_ps(acc, (__m512bh)v, (__m512bh)w);
#endif
    return _mm512_fmadd_ps(v, w, acc);
}

/* Adds one input row's taps, for input steps [c0, c1) (single: see conv_bcast), to the
 * accumulators a0 (use0: the upper output row, weights of tap row ky0) and a1 (use1: the lower
 * one, tap row ky1) of the np pixels from x0. wp: the packed weights, as steps of 16 lanes of
 * 32 bits; steps: per tap. */
static inline __attribute__((always_inline)) void conv_taps(
    const int bf16, const int single, __m512 *a0, __m512 *a1, const int use0, const int use1, const char *srow,
    int ky0, int ky1, i64 x0, const int np, const int first, const int last, i64 ldx, i64 steps, i64 c0, i64 c1,
    const float *wp)
{
    const i64 esize = bf16 ? 2 : 4;
#pragma GCC unroll 3
    for (int dx = 0; dx < 3; dx++) {
        /* the block's first pixel has no left neighbour at a row's start, its last none at its end */
        const int skip0 = first && dx == 0, skip1 = last && dx == 2;
        if (np == 1 && (skip0 || skip1))
            continue;
        const char *src = srow + (x0 + dx - 1) * ldx * esize;
        const float *w0 = wp + (ky0 * 3 + dx) * steps * 16, *w1 = wp + (ky1 * 3 + dx) * steps * 16;
        for (i64 c = c0; c < c1; c++) {
            __m512 wv0 = use0 ? _mm512_loadu_ps(w0 + c * 16) : _mm512_setzero_ps();
            __m512 wv1 = use1 ? _mm512_loadu_ps(w1 + c * 16) : _mm512_setzero_ps();
#pragma GCC unroll 16
            for (int p = 0; p < np; p++) {
                if ((p == 0 && skip0) || (p == np - 1 && skip1))
                    continue;
                __m512 v = conv_bcast(bf16, single, src + p * ldx * esize, c);
                if (use0)
                    a0[p] = conv_madd(bf16, a0[p], v, wv0);
                if (use1)
                    a1[p] = conv_madd(bf16, a1[p], v, wv1);
            }
        }
    }
}

/* conv_taps for all input steps; a bf16 input with an odd channel count reads its last channel
 * alone rather than past the row. */
static inline __attribute__((always_inline)) void conv_row_taps(
    const int bf16, __m512 *a0, __m512 *a1, const int use0, const int use1, const char *srow, int ky0, int ky1,
    i64 x0, const int np, const int first, const int last, i64 ldx, i64 cin, const float *wp)
{
    i64 steps = bf16 ? (cin + 1) / 2 : cin, whole = bf16 ? cin / 2 : cin;
    conv_taps(bf16, 0, a0, a1, use0, use1, srow, ky0, ky1, x0, np, first, last, ldx, steps, 0, whole, wp);
    if (bf16 && whole < steps)
        conv_taps(bf16, 1, a0, a1, use0, use1, srow, ky0, ky1, x0, np, first, last, ldx, steps, whole, steps, wp);
}

/* One block: output rows y and (two) y + 1 of image img, np pixels from x0. */
static inline __attribute__((always_inline)) void conv_block(
    const int bf16, const int np, const char *x, i64 ldx, i64 img, i64 h, i64 w, i64 y, int two, i64 x0,
    int first, int last, i64 cin, const float *wp, char *out, i64 ldo, __mmask16 om)
{
    const i64 esize = bf16 ? 2 : 4;
    __m512 a0[CONV_PIXELS], a1[CONV_PIXELS];
#pragma GCC unroll 16
    for (int p = 0; p < np; p++) {
        a0[p] = _mm512_setzero_ps();
        a1[p] = _mm512_setzero_ps();
    }
    for (int iy = -1; iy <= 2; iy++) { /* input row y + iy: tap row iy + 1 above, iy below */
        i64 sy = y + iy;
        if (sy < 0 || sy >= h)
            continue;
        const char *srow = x + (img * h + sy) * w * ldx * esize;
        int use0 = iy <= 1, use1 = two && iy >= 0;
        if (use0 && use1)
            conv_row_taps(bf16, a0, a1, 1, 1, srow, iy + 1, iy, x0, np, first, last, ldx, cin, wp);
        else if (use0)
            conv_row_taps(bf16, a0, a1, 1, 0, srow, iy + 1, 0, x0, np, first, last, ldx, cin, wp);
        else if (use1)
            conv_row_taps(bf16, a0, a1, 0, 1, srow, 0, iy, x0, np, first, last, ldx, cin, wp);
    }
    for (int r = 0; r <= two; r++) {
        char *o = out + ((img * h + y + r) * w + x0) * ldo * esize;
#pragma GCC unroll 16
        for (int p = 0; p < np; p++) {
            __m512 v = r ? a1[p] : a0[p];
#if CONV_BF16
            if (bf16) {
                _mm256_mask_storeu_epi16(o + p * ldo * esize, om, (__m256i)_mm512_cvtneps_pbh(v));
                continue;
            }
#endif
            _mm512_mask_storeu_ps((float *)(o + p * ldo * esize), om, v);
        }
    }
}

/* A copy of conv_block per pixel count and dtype, each its own function (one function holding
 * them all took GCC minutes to compile), called through a table. */
typedef void (*conv_fn)(const char *, i64, i64, i64, i64, i64, int, i64, int, int, i64, const float *, char *, i64,
                        __mmask16);
#define CONV_FN(b, k)                                                                          \
    static void conv_block_##b##_##k(const char *x, i64 ldx, i64 img, i64 h, i64 w, i64 y, int two, i64 x0, \
                                     int first, int last, i64 cin, const float *wp, char *out, i64 ldo, \
                                     __mmask16 om)                                             \
    {                                                                                          \
        conv_block(b, k, x, ldx, img, h, w, y, two, x0, first, last, cin, wp, out, ldo, om);    \
    }
#define CONV_FNS(b)                                                                            \
    CONV_FN(b, 1) CONV_FN(b, 2) CONV_FN(b, 3) CONV_FN(b, 4) CONV_FN(b, 5) CONV_FN(b, 6) CONV_FN(b, 7) \
    CONV_FN(b, 8) CONV_FN(b, 9) CONV_FN(b, 10) CONV_FN(b, 11) CONV_FN(b, 12) CONV_FN(b, 13) CONV_FN(b, 14)
#define CONV_TABLE(b)                                                                          \
    {conv_block_##b##_1, conv_block_##b##_2, conv_block_##b##_3, conv_block_##b##_4, conv_block_##b##_5, \
     conv_block_##b##_6, conv_block_##b##_7, conv_block_##b##_8, conv_block_##b##_9, conv_block_##b##_10, \
     conv_block_##b##_11, conv_block_##b##_12, conv_block_##b##_13, conv_block_##b##_14}
CONV_FNS(0)
static const conv_fn conv_f32[CONV_PIXELS] = CONV_TABLE(0);
#if CONV_BF16
CONV_FNS(1)
static const conv_fn conv_bf16[CONV_PIXELS] = CONV_TABLE(1);
#endif

static void conv3x3(const conv_fn *fns, const void *x, i64 ldx, i64 n, i64 h, i64 w, i64 cin, const float *wp,
                    i64 cout, void *out, i64 ldo, int threads)
{
    __mmask16 om = (__mmask16)((1u << cout) - 1);
    i64 pairs = (h + 1) / 2, blocks = (w + CONV_PIXELS - 1) / CONV_PIXELS;
    int nt = team(n * h * w, 9 * cin, threads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < n * pairs; r++) {
        i64 img = r / pairs, y = (r % pairs) * 2, x0 = 0;
        for (i64 b = 0; b < blocks; b++) { /* blocks of near-equal size */
            int np = (int)((w - x0 + blocks - b - 1) / (blocks - b));
            fns[np - 1](x, ldx, img, h, w, y, y + 1 < h, x0, x0 == 0, x0 + np == w, cin, wp, out, ldo, om);
            x0 += np;
        }
    }
}

/* A network's first convolution where it feeds a dense block (a DenseNet-BC stem: 3x3 on one
 * or three channels, stride 1 or 2): from an NCHW image batch into a channels-last (N*OH*OW,
 * cout) matrix, which the block copies into its buffer as whole rows. oneDNN's convolution took
 * 120-150 us on the `make run` model's stem (1 to 24 channels, 14x14, batch 64) and its NCHW
 * output another 100 us to transpose, for 2.7 M multiply-adds (docs/performance.md#pruning).
 * Each group of STEM_PIXELS output pixels of a row keeps its pixels' cout outputs in up to
 * STEM_VECS 16-lane float32 accumulators each and adds each tap's input value, broadcast, times
 * the tap's packed weights, loaded once for the group: (cin*kh*kw, 16*nv)
 * float32, zero past cout (bf16 weights are rounded to bf16 by native.py first). Taps in the
 * padding are left out; the sums' order does not depend on the thread count; bf16 outputs are
 * rounded to nearest even. */
#define STEM_VECS 4
#define STEM_PIXELS 4

static inline __attribute__((always_inline)) void stem_pixels(
    const int bf16, const int nv, const int np, const char *x, i64 cin, i64 h, i64 w, i64 iy0, i64 ix0, i64 sx,
    i64 kh, i64 kw, const float *wp, char *o, i64 cout, __mmask16 last)
{
    const i64 esize = bf16 ? 2 : 4;
    __m512 acc[STEM_PIXELS][STEM_VECS];
#pragma GCC unroll 4
    for (int p = 0; p < np; p++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            acc[p][j] = _mm512_setzero_ps();
    for (i64 c = 0; c < cin; c++)
        for (i64 ky = 0; ky < kh; ky++) {
            i64 iy = iy0 + ky;
            if (iy < 0 || iy >= h)
                continue;
            const char *src = x + (c * h + iy) * w * esize;
            for (i64 kx = 0; kx < kw; kx++) {
                const float *wt = wp + ((c * kh + ky) * kw + kx) * nv * 16;
                __m512 wv[STEM_VECS];
#pragma GCC unroll 4
                for (int j = 0; j < nv; j++)
                    wv[j] = _mm512_loadu_ps(wt + j * 16);
#pragma GCC unroll 4
                for (int p = 0; p < np; p++) {
                    i64 ix = ix0 + p * sx + kx;
                    if (ix < 0 || ix >= w)
                        continue;
                    __m512 v;
                    if (bf16)
                        v = _mm512_castsi512_ps(_mm512_set1_epi32((int32_t)((uint32_t)((const uint16_t *)src)[ix] << 16)));
                    else
                        v = _mm512_set1_ps(((const float *)src)[ix]);
#pragma GCC unroll 4
                    for (int j = 0; j < nv; j++)
                        acc[p][j] = _mm512_fmadd_ps(v, wv[j], acc[p][j]);
                }
            }
        }
#pragma GCC unroll 4
    for (int p = 0; p < np; p++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) {
            __mmask16 m = j == nv - 1 ? last : (__mmask16)0xffff;
            char *dst = o + (p * cout + j * 16) * esize;
#if CONV_BF16
            if (bf16) {
                _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(acc[p][j]));
                continue;
            }
#endif
            _mm512_mask_storeu_ps((float *)dst, m, acc[p][j]);
        }
}

/* One output row: stem_pixels on groups of STEM_PIXELS pixels and the rest; a copy per dtype and
 * accumulator count (see conv_fn). */
typedef void (*stem_fn)(const char *, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, const float *, char *,
                        __mmask16);
#define STEM_FN(b, k)                                                                          \
    static void stem_row_##b##_##k(const char *x, i64 cin, i64 h, i64 w, i64 iy0, i64 kh, i64 kw, i64 sx, \
                                   i64 px, i64 ow, i64 cout, const float *wp, char *o, __mmask16 last) \
    {                                                                                          \
        i64 ox = 0;                                                                            \
        for (; ox + STEM_PIXELS <= ow; ox += STEM_PIXELS)                                      \
            stem_pixels(b, k, STEM_PIXELS, x, cin, h, w, iy0, ox * sx - px, sx, kh, kw, wp,      \
                        o + ox * cout * (b ? 2 : 4), cout, last);                              \
        for (; ox < ow; ox++)                                                                  \
            stem_pixels(b, k, 1, x, cin, h, w, iy0, ox * sx - px, sx, kh, kw, wp, o + ox * cout * (b ? 2 : 4), \
                        cout, last);                                                           \
    }
STEM_FN(0, 1) STEM_FN(0, 2) STEM_FN(0, 3) STEM_FN(0, 4)
static const stem_fn stem_f32[STEM_VECS] = {stem_row_0_1, stem_row_0_2, stem_row_0_3, stem_row_0_4};
#if CONV_BF16
STEM_FN(1, 1) STEM_FN(1, 2) STEM_FN(1, 3) STEM_FN(1, 4)
static const stem_fn stem_bf16[STEM_VECS] = {stem_row_1_1, stem_row_1_2, stem_row_1_3, stem_row_1_4};
#endif

static void stem_conv(const stem_fn *fns, i64 esize, const char *x, i64 n, i64 cin, i64 h, i64 w,
                      const float *wp, i64 cout, i64 kh, i64 kw, i64 sy, i64 sx, i64 py, i64 px, i64 oh, i64 ow,
                      char *out, int threads)
{
    i64 nv = (cout + 15) / 16;
    __mmask16 last = (__mmask16)((1u << (cout - (nv - 1) * 16)) - 1);
    int nt = team(n * oh * ow, cout * cin * kh * kw, threads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 r = 0; r < n * oh; r++) {
        i64 img = r / oh, oy = r % oh;
        fns[nv - 1](x + img * cin * h * w * esize, cin, h, w, oy * sy - py, kh, kw, sx, px, ow, cout, wp,
                    out + r * ow * cout * esize, last);
    }
}

/* A 1x1 convolution with a bias and optionally a ReLU, (rows, cin) to (rows, cout <= 64), each
 * matrix with its own leading dimension: a dense layer's bottleneck, with its second batch
 * norm folded in, on narrow inputs. oneDNN's bf16 product took 100-150 us for 12,544 rows of 16
 * or 32 channels into 24 on a Zen 4 EPYC, a fifth of the machine's bf16 rate
 * (docs/performance.md#pruning). Groups of rows keep their outputs in 16-lane float32
 * accumulators, started from the bias; each input step (a float32 channel, or a bf16 pair for
 * the AVX512-BF16 dot product, as conv_bcast reads them) is broadcast once per row and
 * multiplied by the step's packed weights, loaded once per group: float32 (cin, 16*nv), bf16
 * (cin/2 rounded up, 16*nv, 2), zero past cout. The sums' order does not depend on the thread
 * count; bf16 outputs are rounded to nearest even. */
#define PW_VECS 4
#define PW_MAX_OUT 128

static inline __attribute__((always_inline)) void pw_rows(
    const int bf16, const int nv, const int np, const char *x, i64 ldx, i64 cin, const float *wp, const float *bias,
    const int relu, char *o, i64 ldo, __mmask16 last)
{
    const i64 esize = bf16 ? 2 : 4;
    __m512 acc[8][PW_VECS];
#pragma GCC unroll 4
    for (int j = 0; j < nv; j++) {
        __m512 b = _mm512_loadu_ps(bias + j * 16);
#pragma GCC unroll 8
        for (int p = 0; p < np; p++)
            acc[p][j] = b;
    }
    i64 steps = bf16 ? (cin + 1) / 2 : cin, whole = bf16 ? cin / 2 : cin;
    for (i64 c = 0; c < steps; c++) {
        const int single = c >= whole;
        __m512 wv[PW_VECS];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            wv[j] = _mm512_loadu_ps(wp + (c * nv + j) * 16);
#pragma GCC unroll 8
        for (int p = 0; p < np; p++) {
            __m512 v = conv_bcast(bf16, single, x + p * ldx * esize, c);
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[p][j] = conv_madd(bf16, acc[p][j], v, wv[j]);
        }
    }
#pragma GCC unroll 8
    for (int p = 0; p < np; p++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) {
            /* zero first: max returns its second operand where one is NaN, as torch.relu keeps it */
            __m512 v = relu ? _mm512_max_ps(_mm512_setzero_ps(), acc[p][j]) : acc[p][j];
            __mmask16 m = j == nv - 1 ? last : (__mmask16)0xffff;
            char *dst = o + (p * ldo + j * 16) * esize;
#if CONV_BF16
            if (bf16) {
                _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(v));
                continue;
            }
#endif
            _mm512_mask_storeu_ps((float *)dst, m, v);
        }
}

/* Groups of 8 rows with one or two accumulators a row, of 4 with three or four, then one row,
 * then 4 rows with one or two (the narrow last chunk of more than 16 * PW_VECS outputs, whose
 * groups are of 4 rows: row by row it ran at half oneDNN's rate); a copy per dtype,
 * accumulator count and group size (see conv_fn). */
typedef void (*pw_fn)(const char *, i64, i64, const float *, const float *, int, char *, i64, __mmask16);
#define PW_FN(b, k, n)                                                                         \
    static void pw_##b##_##k##_##n(const char *x, i64 ldx, i64 cin, const float *wp, const float *bias, int relu, \
                                   char *o, i64 ldo, __mmask16 last)                           \
    {                                                                                          \
        pw_rows(b, k, n, x, ldx, cin, wp, bias, relu, o, ldo, last);                            \
    }
#define PW_FNS(b)                                                                              \
    PW_FN(b, 1, 8) PW_FN(b, 2, 8) PW_FN(b, 3, 4) PW_FN(b, 4, 4)                                \
    PW_FN(b, 1, 1) PW_FN(b, 2, 1) PW_FN(b, 3, 1) PW_FN(b, 4, 1) PW_FN(b, 1, 4) PW_FN(b, 2, 4)
#define PW_TABLE(b)                                                                            \
    {{pw_##b##_1_8, pw_##b##_1_1, pw_##b##_1_4}, {pw_##b##_2_8, pw_##b##_2_1, pw_##b##_2_4},     \
     {pw_##b##_3_4, pw_##b##_3_1, pw_##b##_3_4}, {pw_##b##_4_4, pw_##b##_4_1, pw_##b##_4_4}}
PW_FNS(0)
static const pw_fn pw_f32[PW_VECS][3] = PW_TABLE(0);
#if CONV_BF16
PW_FNS(1)
static const pw_fn pw_bf16[PW_VECS][3] = PW_TABLE(1);
#endif

/* Every cache line of the bytes [p, p + bytes), prefetched (past the matrix it does not fault) */
static inline void line_prefetch(const void *p, i64 bytes)
{
    uintptr_t line = (uintptr_t)p & ~(uintptr_t)63, end = (uintptr_t)p + (uintptr_t)bytes;
    for (; line < end; line += 64)
        _mm_prefetch((const char *)line, _MM_HINT_T0);
}

/* Where one chunk holds every output, a prologue tile holds up to PW_TILE_ROWS rows and at most
 * PW_TILE_BYTES of them (but never fewer than one group of rows), so that it stays in L1 while
 * the product reads it back group by group. */
#define PW_TILE_ROWS 64
#define PW_TILE_BYTES 16384
#define PW_AHEAD 16

/* Rows per prologue tile: a multiple of the product's group of rows. */
static i64 pw_tile_rows(i64 group, i64 cin, i64 esize)
{
    if (cin < 1)
        return group;
    i64 t = PW_TILE_BYTES / (cin * esize);
    t = t > PW_TILE_ROWS ? PW_TILE_ROWS : t;
    t -= t % group;
    return t < group ? group : t;
}

/* relu(x * scale + shift) of n rows of cols values into the contiguous tile o, as bn_relu_row forms
 * each row (the same values, bit for bit), a block of 16 columns at a time down the rows: a
 * block's scale and shift are loaded once for the tile, not once a row. While forming the first
 * block it prefetches each row's successor `ahead` rows further on, from memory. */
static inline __attribute__((always_inline)) void bn_relu_tile(
    const int bf16, const char *x, i64 ldx, i64 n, char *o, i64 cols, const float *scale, const float *shift,
    i64 ahead)
{
    const i64 esize = bf16 ? 2 : 4;
    for (i64 j = 0; j < cols; j += 16) {
        const __mmask16 m = lanes_at(j, cols);
        const __m512 sc = ld_vec(m, scale + j), sh = ld_vec(m, shift + j);
        for (i64 p = 0; p < n; p++) {
            const char *src = x + (p * ldx + j) * esize;
            char *dst = o + (p * cols + j) * esize;
            if (j == 0)
                line_prefetch(x + (p + ahead) * ldx * esize, cols * esize);
            if (m == 0xFFFFu)
                stu_x16(bf16, dst, bn_relu_v(ldu_x16(bf16, src), sc, sh));
            else
                st_x16(bf16, dst, m, bn_relu_v(ld_x16(bf16, m, src), sc, sh));
        }
    }
}

/* The product of rows [r, r + n); with scale, of relu(x * scale + shift) instead of x: each
 * thread forms those rows in its tile, which stays in L1 or L2, so the BN-ReLU output a
 * training step's first convolution reads never goes to memory and back. Apart from that pass
 * over the input (about 6 bytes of memory traffic per value, bf16), the same product, the same
 * sums. Where one chunk holds every output, the tile holds up to pw_tile_rows rows, its BN-ReLU
 * formed a block of columns at a time (bn_relu_tile; a pruned layer's gather a group of columns
 * at a time, in sub-tiles of GATHER_TILE rows): formed a group of 8 rows at a time, row by row,
 * the prologue cost about as much as the product on a pruned layer's narrow inputs
 * (docs/performance.md, "The 1x1 convolution's prologue in tiles"). Outputs past 16 * PW_VECS
 * (a densenet121 bottleneck's 128) are done in chunks of that many from the same tile, each
 * chunk's weights packed on their own (native.py's Pointwise): the input is read and its BN-ReLU
 * formed once for all of them. The rows go in groups of `group` (fns[v - 1][0] for 8 rows, one
 * or two vectors of outputs, [2] for 4), the rows past the last whole group one by one ([1]). */
static void pw_tile(const pw_fn (*fns)[3], i64 group, i64 nv, i64 esize, const char *x, i64 ldx, i64 r, i64 n,
                    i64 cin, const float *wp, const float *bias, int relu, char *out, i64 ldo, __mmask16 last,
                    const float *scale, const float *shift, const group_t *g, i64 groups, i64 xcols, char *tile)
{
    const char *src = x + r * ldx * esize;
    i64 lds = ldx;
    if (g) { /* a pruned layer's columns, gathered (and BN-ReLU'd) into the tile as dk_gather_cols does */
        for (i64 p = 0; p < n; p++)
            line_prefetch(src + (p + PW_AHEAD) * ldx * esize, xcols * esize);
        gather_rows_avx512(esize == 2, src, ldx, xcols, g, groups, tile, cin, 0, n, scale, shift);
        src = tile, lds = cin;
    } else if (scale) {
        if (n <= group) /* past 64 outputs (see pointwise), or a last part tile of at most one group: row by
                         * row, as before the tiles, each row's successor prefetched */
            for (i64 p = 0; p < n; p++) {
                line_prefetch(src + (p + PW_AHEAD) * ldx * esize, cin * esize);
                bn_relu_row(esize == 2, src + p * ldx * esize, tile + p * cin * esize, cin, scale, shift);
            }
        else if (esize == 2)
            bn_relu_tile(1, src, ldx, n, tile, cin, scale, shift, PW_AHEAD);
        else
            bn_relu_tile(0, src, ldx, n, tile, cin, scale, shift, PW_AHEAD);
        src = tile, lds = cin;
    }
    const i64 steps = esize == 2 ? (cin + 1) / 2 : cin;
    for (i64 p = 0; p < n;) {
        const i64 rows = p + group <= n ? group : 1; /* a group: 8 rows where every chunk is narrow (nv <= 2), else 4 */
        for (i64 j = 0; j < nv; j += PW_VECS) {
            const i64 k = nv - j < PW_VECS ? nv - j : PW_VECS;
            const __mmask16 m = j + k == nv ? last : (__mmask16)0xffff;
            fns[k - 1][rows == 1 ? 1 : group == 8 ? 0 : 2](src + p * lds * esize, lds, cin, wp + j * 16 * steps,
                                                           bias + j * 16, relu, out + ((r + p) * ldo + j * 16) * esize,
                                                           ldo, m);
        }
        p += rows;
    }
}

static int pointwise(const pw_fn (*fns)[3], i64 esize, const char *x, i64 ldx, i64 rows, i64 cin, const float *wp,
                     const float *bias, i64 cout, int relu, char *out, i64 ldo, const float *scale,
                     const float *shift, const i64 *idx, i64 xcols, int threads)
{
    i64 nv = (cout + 15) / 16, group = nv <= 2 ? 8 : 4, ngroups = 0;
    __mmask16 last = (__mmask16)((1u << (cout - (nv - 1) * 16)) - 1);
    if (idx && columns_width(idx, cin, xcols) < 0)
        return 3;
    group_t *g = idx ? plan_groups(idx, cin, &ngroups) : 0;
    if (idx && !g)
        return -1;
    const int formed = scale || g; /* the input is formed in a tile first */
    /* a tile of many rows where one chunk holds every output; past 64 outputs (two chunks) one group
     * a tile, as before: there the product dominates, and larger tiles measured no faster. A tile
     * is at most each thread's share of the rows (rounded up to whole groups), so that few rows
     * are still split between the threads; whole groups, so the rows' groups stay the same. */
    int nt = team(rows, cout * cin, threads), failed = 0;
    i64 per = formed && nv <= PW_VECS ? pw_tile_rows(group, cin, esize) : group;
    i64 share = (rows + nt - 1) / nt;
    share += (group - share % group) % group;
    per = per < share ? per : share;
    const i64 tiles = (rows + per - 1) / per;
#pragma omp parallel num_threads(nt)
    {
        char *tile = formed ? malloc((size_t)(per * cin * esize)) : 0;
        if (formed && !tile) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (i64 b = 0; b < tiles; b++) {
                i64 r = b * per, n = rows - r < per ? rows - r : per;
                pw_tile(fns, group, nv, esize, x, ldx, r, n, cin, wp, bias, relu, out, ldo, last, scale, shift, g,
                        ngroups, xcols, tile);
            }
        }
        free(tile);
    }
    free(g);
    return failed ? -1 : 0;
}

/* out (cout, cin) = the threads' weight-gradient sums (n of them, each (cout, width)) added in
 * thread order; called by every thread of a team, which shares the rows of out between them. */
static void sum_thread_parts(const float *sums, int n, i64 cout, i64 cin, i64 width, float *out)
{
#pragma omp for schedule(static)
    for (i64 o = 0; o < cout; o++)
        for (i64 c = 0; c < cin; c++) {
            float v = 0.f;
            for (int t = 0; t < n; t++)
                v += sums[(size_t)t * (size_t)(cout * width) + o * width + c];
            out[o * cin + c] = v;
        }
}

#if CONV_BF16
/* The bf16 weight gradient of a bottleneck's first convolution, a tile of rows at a time (the
 * one-pass backward below runs it):
 *   dw[o][c] += sum_r g[r][o] * a[r][c],  a = relu(x * scale + shift) rounded to bf16,
 * from the block's buffer x itself: oneDNN's product needs a in memory, which backward formed
 * in one more pass over the buffer's columns (BC-100's first block: 50,176 rows of up to 204
 * channels). A tile of up to WG_PAIRS row pairs forms its a as bf16 pairs of rows (r, r + 1)
 * per column, the AVX512-BF16 dot product's operand, and g's as pairs per output, then adds
 * its products to the thread's float32 sums, a block of WG_OUT outputs by WG_VECS 16-column
 * vectors at a time in registers. */
#define WG_PAIRS 32
#define WG_OUT 6
#define WG_VECS 4
#define WG_AHEAD 32

/* pairs of bf16 values, lo in the low half of each 32-bit lane: the dot product's (r, r + 1) */
static inline __m512i wg_pair(__m512i lo, __m512i hi)
{
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

static inline __attribute__((always_inline)) void wg_block(const int no, const int nv, const __m512i *a, i64 nvc,
                                                           const uint32_t *gp, i64 cout, i64 pairs, float *acc,
                                                           i64 ldacc)
{
    __m512 s[WG_OUT][WG_VECS];
#pragma GCC unroll 6
    for (int o = 0; o < no; o++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            s[o][j] = _mm512_loadu_ps(acc + o * ldacc + j * 16);
    for (i64 p = 0; p < pairs; p++) {
        __m512 av[WG_VECS];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            av[j] = _mm512_castsi512_ps(_mm512_loadu_si512(a + p * nvc + j));
#pragma GCC unroll 6
        for (int o = 0; o < no; o++) {
            __m512 gv = _mm512_castsi512_ps(_mm512_set1_epi32((int)gp[p * cout + o]));
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                s[o][j] = _mm512_dpbf16_ps(s[o][j], (__m512bh)gv, (__m512bh)av[j]);
        }
    }
#pragma GCC unroll 6
    for (int o = 0; o < no; o++)
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            _mm512_storeu_ps(acc + o * ldacc + j * 16, s[o][j]);
}

typedef void (*wg_fn)(const __m512i *, i64, const uint32_t *, i64, i64, float *, i64);
#define WG_FN(o, v)                                                                             \
    static void wg_##o##_##v(const __m512i *a, i64 nvc, const uint32_t *gp, i64 cout, i64 pairs, float *acc, \
                             i64 ldacc)                                                         \
    {                                                                                           \
        wg_block(o, v, a, nvc, gp, cout, pairs, acc, ldacc);                                    \
    }
#define WG_ROW(o) WG_FN(o, 1) WG_FN(o, 2) WG_FN(o, 3) WG_FN(o, 4)
WG_ROW(1) WG_ROW(2) WG_ROW(3) WG_ROW(4) WG_ROW(5) WG_ROW(6)
#define WG_TABLE_ROW(o) {wg_##o##_1, wg_##o##_2, wg_##o##_3, wg_##o##_4}
static const wg_fn wg_fns[WG_OUT][WG_VECS] = {WG_TABLE_ROW(1), WG_TABLE_ROW(2), WG_TABLE_ROW(3),
                                              WG_TABLE_ROW(4), WG_TABLE_ROW(5), WG_TABLE_ROW(6)};

/* One tile: rows [r, r + n) of the thread's range into its sums acc (cout, 16 * nvc) */
static void wg_tile(const uint16_t *g, i64 ldg, const uint16_t *x, i64 ldx, i64 r, i64 n, i64 cin, i64 cout,
                    const float *scale, const float *shift, __m512i *a, uint32_t *gp, float *acc)
{
    i64 nvc = (cin + 15) / 16, pairs = (n + 1) / 2;
    for (i64 p = 0; p < pairs; p++) {
        const uint16_t *x0 = x + (r + 2 * p) * ldx, *g0 = g + (r + 2 * p) * ldg;
        const int two = 2 * p + 1 < n; /* the last pair of an odd count has no second row: zeros */
        /* the rows WG_AHEAD further on, from memory: without it the loads below waited on each
         * row in turn (the tile's forming took longer than its products; a prefetch past the
         * matrix is harmless, it does not fault) */
        line_prefetch(x0 + WG_AHEAD * ldx, 2 * cin);
        line_prefetch(x0 + (WG_AHEAD + 1) * ldx, 2 * cin);
        line_prefetch(g0 + WG_AHEAD * ldg, 2 * cout);
        line_prefetch(g0 + (WG_AHEAD + 1) * ldg, 2 * cout);
        for (i64 j = 0; j < nvc; j++) {
            __mmask16 m = lanes_at(j * 16, cin);
            __m512 sc = ld_vec(m, scale + j * 16), sh = ld_vec(m, shift + j * 16);
            /* lanes past cin are zero: relu(0 * scale + shift) there would not be */
            __m512i lo = _mm512_maskz_mov_epi32(m, bf16_lanes(bn_relu_v(ld_lanes(1, m, x0 + j * 16), sc, sh)));
            __m512i hi = two ? _mm512_maskz_mov_epi32(m, bf16_lanes(bn_relu_v(ld_lanes(1, m, x0 + ldx + j * 16),
                                                                                 sc, sh)))
                             : _mm512_setzero_si512();
            a[p * nvc + j] = wg_pair(lo, hi);
        }
        for (i64 o = 0; o < cout; o += 16) {
            __mmask16 m = lanes_at(o, cout);
            __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, g0 + o));
            __m512i hi = two ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, g0 + ldg + o)) : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(gp + p * cout + o, m, wg_pair(lo, hi));
        }
    }
    for (i64 o = 0; o < cout; o += WG_OUT) {
        int no = cout - o < WG_OUT ? (int)(cout - o) : WG_OUT;
        for (i64 j = 0; j < nvc; j += WG_VECS) {
            int nv = nvc - j < WG_VECS ? (int)(nvc - j) : WG_VECS;
            wg_fns[no - 1][nv - 1](a + j, nvc, gp + o, cout, pairs, acc + o * nvc * 16 + j * 16, nvc * 16);
        }
    }
}

#endif /* CONV_BF16 */

/* The whole backward of a bottleneck's first convolution in a training step, where that
 * layer reads a prefix x (rows, cin) of the block's buffer through a BN-ReLU:
 *   d[r][c]  = sum_o g[r][o] * w[o][c] where x[r][c] * scale[c] + shift[c] > 0, else 0,
 *   sum_d[c] = sum_r d,   sum_dx[c] = sum_r d * (x - mean[c]),
 *   acc      = src + d * k[c]  (src NULL: acc itself),
 *   dw       = the weight gradient, sum_r g[r][o] * relu(x * scale + shift)[r][c] (dw NULL: not
 *              formed), in bfloat16 as wg_tile forms it.
 * Unfused, these were four passes over (rows, cin) matrices in bfloat16 (oneDNN's product
 * writing d, the mask and sums reading d, x and acc and writing acc, the weight gradient
 * reading x again) and six in float32 (where the BN-ReLU output was formed too). Here each
 * thread takes tiles of PB_TILE rows: the weight gradient's products, then, while the tile's x
 * and g are in cache, d in float32 registers, PB_ROWS rows by PB_VECS 16-column vectors at a
 * time, and its mask, sums and accumulation; d never reaches memory and is not rounded. The
 * sums of each column are added in row order in float64 per thread, the threads' in thread
 * order. Matrices are float32, or bfloat16 (bf16) where this
 * build has AVX512-BF16. */
#define PB_ROWS 4
#define PB_VECS 4
#define PB_AHEAD 16
#define PB_TILE 64
#define PB_MIN_ROWS 256

/* s[l] += (lo, hi)[l] for the lanes of m, 16 float64 sums */
static inline void add_f64x2(double *s, __mmask16 m, __m512d lo, __m512d hi)
{
    __mmask8 ml = (__mmask8)m, mh = (__mmask8)(m >> 8);
    _mm512_mask_storeu_pd(s, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, s), lo));
    if (mh)
        _mm512_mask_storeu_pd(s + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, s + 8), hi));
}

typedef struct {
    const char *g, *x, *src;
    char *acc;
    i64 ldg, ldx, ldsrc, ldacc, cin, cout, nvc;
    const void *wp; /* w packed: bf16 pairs of outputs (2p, 2p + 1) per column as 32-bit lanes,
                     * (ceil(cout / 2), nvc) vectors; float32 (cout, nvc) vectors */
    const float *scale, *shift, *mean, *k;
} pb_args;

static inline __attribute__((always_inline)) void pb_block(const int bf16, const int nr, const int nv,
                                                           const pb_args *q, i64 r, i64 j, double *ps, double *px)
{
    const i64 es = bf16 ? 2 : 4;
    __m512 d[PB_ROWS][PB_VECS];
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++)
            d[i][v] = _mm512_setzero_ps();
    /* the same columns of the rows PB_AHEAD on, while the products below run without memory:
     * the epilogue's loads otherwise waited on each line in turn (2.8x as long) */
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        const i64 ra = r + i + PB_AHEAD;
        line_prefetch(q->x + (ra * q->ldx + j * 16) * es, 16 * es * nv);
        line_prefetch(q->src + (ra * q->ldsrc + j * 16) * es, 16 * es * nv);
        if (q->src != q->acc)
            line_prefetch(q->acc + (ra * q->ldacc + j * 16) * es, 16 * es * nv);
    }
#if CONV_BF16
    if (bf16) {
        const __m512i *wp = q->wp;
        const i64 full = q->cout / 2;
        for (i64 p = 0; p < full; p++) {
            __m512i w[PB_VECS];
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++)
                w[v] = _mm512_loadu_si512(wp + p * q->nvc + j + v);
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                uint32_t pair;
                memcpy(&pair, q->g + ((r + i) * q->ldg + 2 * p) * 2, sizeof pair);
                __m512 gv = _mm512_castsi512_ps(_mm512_set1_epi32((int)pair));
#pragma GCC unroll 4
                for (int v = 0; v < nv; v++)
                    d[i][v] = _mm512_dpbf16_ps(d[i][v], (__m512bh)gv, (__m512bh)_mm512_castsi512_ps(w[v]));
            }
        }
        if (q->cout & 1) { /* the last output alone: its pair's other half is zero in g and in w */
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                uint16_t last;
                memcpy(&last, q->g + ((r + i) * q->ldg + q->cout - 1) * 2, sizeof last);
                __m512 gv = _mm512_castsi512_ps(_mm512_set1_epi32((int)last));
#pragma GCC unroll 4
                for (int v = 0; v < nv; v++)
                    d[i][v] = _mm512_dpbf16_ps(d[i][v], (__m512bh)gv,
                                               (__m512bh)_mm512_castsi512_ps(_mm512_loadu_si512(wp + full * q->nvc + j + v)));
            }
        }
    }
#endif
    if (!bf16) {
        const float *wp = q->wp;
        const float *g = (const float *)q->g;
        for (i64 o = 0; o < q->cout; o++) {
            __m512 w[PB_VECS];
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++)
                w[v] = _mm512_loadu_ps(wp + (o * q->nvc + j + v) * 16);
#pragma GCC unroll 4
            for (int i = 0; i < nr; i++) {
                __m512 gv = _mm512_set1_ps(g[(r + i) * q->ldg + o]);
#pragma GCC unroll 4
                for (int v = 0; v < nv; v++)
                    d[i][v] = _mm512_fmadd_ps(gv, w[v], d[i][v]);
            }
        }
    }
#pragma GCC unroll 4
    for (int v = 0; v < nv; v++) {
        const i64 c = (j + v) * 16;
        const __mmask16 m = lanes_at(c, q->cin);
        const __m512 sc = ld_vec(m, q->scale + c), sh = ld_vec(m, q->shift + c), mu = ld_vec(m, q->mean + c);
        const __m512 kv = ld_vec(m, q->k + c);
        /* each row's d and d * (x - mean) added in float64, as relu_bn_sums adds them: where
         * batch norm is ill-conditioned (a mean far above the spread) the terms cancel, and
         * float32 partial sums over 4 rows lost 3.5x what the unfused path did */
        __m512d sd0 = _mm512_setzero_pd(), sd1 = _mm512_setzero_pd();
        __m512d sx0 = _mm512_setzero_pd(), sx1 = _mm512_setzero_pd();
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            __m512 xv = ld_lanes(bf16, m, q->x + ((r + i) * q->ldx + c) * es);
            /* the mask as relu_bn_sums reads it from the BN-ReLU's input (or its output, in
             * float32: the same, as the output is not rounded) */
            __mmask16 on = _mm512_cmp_ps_mask(_mm512_fmadd_ps(xv, sc, sh), _mm512_setzero_ps(), _CMP_NLE_UQ);
            __m512 dv = _mm512_maskz_mov_ps(on & m, d[i][v]);
            __m512 dx = _mm512_mul_ps(dv, _mm512_sub_ps(xv, mu));
            sd0 = _mm512_add_pd(sd0, _mm512_cvtps_pd(_mm512_castps512_ps256(dv)));
            sd1 = _mm512_add_pd(sd1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dv), 1))));
            sx0 = _mm512_add_pd(sx0, _mm512_cvtps_pd(_mm512_castps512_ps256(dx)));
            sx1 = _mm512_add_pd(sx1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(dx), 1))));
            st_lanes(bf16, q->acc + ((r + i) * q->ldacc + c) * es, m,
                     _mm512_fmadd_ps(dv, kv, ld_lanes(bf16, m, q->src + ((r + i) * q->ldsrc + c) * es)));
        }
        add_f64x2(ps + c, m, sd0, sd1);
        add_f64x2(px + c, m, sx0, sx1);
    }
}

typedef void (*pb_fn)(const pb_args *, i64, i64, double *, double *);
#define PB_FN(b, i, v)                                                                     \
    static void pb_##b##_##i##_##v(const pb_args *q, i64 r, i64 j, double *ps, double *px) \
    {                                                                                      \
        pb_block(b, i, v, q, r, j, ps, px);                                                \
    }
#define PB_ROW(b, i) PB_FN(b, i, 1) PB_FN(b, i, 2) PB_FN(b, i, 3) PB_FN(b, i, 4)
#define PB_TABLE_ROW(b, i) {pb_##b##_##i##_1, pb_##b##_##i##_2, pb_##b##_##i##_3, pb_##b##_##i##_4}
PB_ROW(0, 1) PB_ROW(0, 2) PB_ROW(0, 3) PB_ROW(0, 4)
static const pb_fn pb_f32[PB_ROWS][PB_VECS] = {PB_TABLE_ROW(0, 1), PB_TABLE_ROW(0, 2), PB_TABLE_ROW(0, 3),
                                               PB_TABLE_ROW(0, 4)};
#if CONV_BF16
PB_ROW(1, 1) PB_ROW(1, 2) PB_ROW(1, 3) PB_ROW(1, 4)
static const pb_fn pb_bf16[PB_ROWS][PB_VECS] = {PB_TABLE_ROW(1, 1), PB_TABLE_ROW(1, 2), PB_TABLE_ROW(1, 3),
                                                PB_TABLE_ROW(1, 4)};
#endif

/* The float32 weight gradient's tile: a = relu(x * scale + shift) of rows [0, n) into the
 * tile (n, 16 * nvc) (zero past cin), then dw (cout, 16 * nvc) += g^T a, a block of WF_OUT
 * outputs by WF_VECS vectors at a time in registers, the rows in order. Each tile's sum is
 * formed from zero and then added: summed in blocks, the rounding error grows with the tile's
 * rows plus the number of tiles, not with all the rows (oneDNN's blocked sum was 14x more
 * accurate than one running sum over 578 rows, measured against float64). */
#define WF_OUT 6
#define WF_VECS 4

static inline __attribute__((always_inline)) void wf_block(const int no, const int nv, const float *a, i64 lda,
                                                           i64 n, const float *g, i64 ldg, float *acc, i64 ldacc)
{
    __m512 s[WF_OUT][WF_VECS];
#pragma GCC unroll 6
    for (int o = 0; o < no; o++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++)
            s[o][v] = _mm512_setzero_ps();
    for (i64 p = 0; p < n; p++) {
        __m512 av[WF_VECS];
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++)
            av[v] = _mm512_loadu_ps(a + p * lda + v * 16);
#pragma GCC unroll 6
        for (int o = 0; o < no; o++) {
            __m512 gv = _mm512_set1_ps(g[p * ldg + o]);
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++)
                s[o][v] = _mm512_fmadd_ps(gv, av[v], s[o][v]);
        }
    }
#pragma GCC unroll 6
    for (int o = 0; o < no; o++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++)
            _mm512_storeu_ps(acc + o * ldacc + v * 16, _mm512_add_ps(_mm512_loadu_ps(acc + o * ldacc + v * 16), s[o][v]));
}

typedef void (*wf_fn)(const float *, i64, i64, const float *, i64, float *, i64);
#define WF_FN(o, v)                                                                                        \
    static void wf_##o##_##v(const float *a, i64 lda, i64 n, const float *g, i64 ldg, float *acc, i64 ldacc) \
    {                                                                                                      \
        wf_block(o, v, a, lda, n, g, ldg, acc, ldacc);                                                     \
    }
#define WF_ROW(o) WF_FN(o, 1) WF_FN(o, 2) WF_FN(o, 3) WF_FN(o, 4)
WF_ROW(1) WF_ROW(2) WF_ROW(3) WF_ROW(4) WF_ROW(5) WF_ROW(6)
#define WF_TABLE_ROW(o) {wf_##o##_1, wf_##o##_2, wf_##o##_3, wf_##o##_4}
static const wf_fn wf_fns[WF_OUT][WF_VECS] = {WF_TABLE_ROW(1), WF_TABLE_ROW(2), WF_TABLE_ROW(3),
                                              WF_TABLE_ROW(4), WF_TABLE_ROW(5), WF_TABLE_ROW(6)};

static void wf_tile(const float *g, i64 ldg, const float *x, i64 ldx, i64 n, i64 cin, i64 cout, const float *scale,
                    const float *shift, float *a, float *acc)
{
    i64 nvc = (cin + 15) / 16, width = 16 * nvc;
    for (i64 p = 0; p < n; p++)
        for (i64 j = 0; j < nvc; j++) {
            __mmask16 m = lanes_at(j * 16, cin);
            /* lanes past cin are zero: relu(0 * scale + shift) there would not be */
            _mm512_storeu_ps(a + p * width + j * 16,
                             _mm512_maskz_mov_ps(m, bn_relu_v(ld_lanes(0, m, x + p * ldx + j * 16),
                                                              ld_vec(m, scale + j * 16), ld_vec(m, shift + j * 16))));
        }
    for (i64 o = 0; o < cout; o += WF_OUT) {
        int no = cout - o < WF_OUT ? (int)(cout - o) : WF_OUT;
        for (i64 j = 0; j < nvc; j += WF_VECS) {
            int nv = nvc - j < WF_VECS ? (int)(nvc - j) : WF_VECS;
            wf_fns[no - 1][nv - 1](a + j * 16, width, n, g + o, ldg, acc + o * width + j * 16, width);
        }
    }
}

static int pointwise_backward(int bf16, const void *g, i64 ldg, const void *x, i64 ldx, i64 rows, i64 cin, i64 cout,
                              const void *w, const float *scale, const float *shift, const float *mean,
                              const float *k, void *acc, i64 ldacc, const void *src, i64 ldsrc, float *sum_d,
                              float *sum_dx, float *dw, int threads)
{
    const pb_fn (*fns)[PB_VECS] = pb_f32;
#if CONV_BF16
    if (bf16)
        fns = pb_bf16;
#endif
    if (bf16 && fns == pb_f32)
        return 2;
    i64 nvc = (cin + 15) / 16, width = nvc * 16, npairs = (cout + 1) / 2;
    int nt = team(rows, cin * cout, threads);
    /* with the weight gradient, at least PB_MIN_ROWS rows a thread: each thread's weight sums
     * are a whole (cout, width) matrix */
    if (dw && nt > 1 && rows / nt < PB_MIN_ROWS)
        nt = rows / PB_MIN_ROWS > 1 ? (int)(rows / PB_MIN_ROWS) : 1;
    /* every buffer before any row is touched: out of memory leaves acc as it was */
    const size_t tile = (size_t)(PB_TILE * width) * sizeof(float), pairs = (size_t)(PB_TILE / 2 * cout);
    void *wp = aligned_alloc(64, (size_t)((bf16 ? npairs : cout) * nvc) * 64);
    float *sums = dw ? calloc((size_t)nt * (size_t)(cout * width), sizeof(float)) : 0;
    char *tiles = dw ? aligned_alloc(64, (size_t)nt * tile) : 0;
    uint32_t *gps = dw && bf16 ? malloc((size_t)nt * pairs * sizeof(uint32_t)) : 0;
    double *p = parts(nt, cin, 2);
    if (!wp || !p || (dw && (!sums || !tiles || (bf16 && !gps)))) {
        free(wp), free(sums), free(tiles), free(gps), free(p);
        return -1;
    }
    if (bf16) {
        const uint16_t *wb = w;
        uint32_t *wq = wp;
        for (i64 i = 0; i < npairs; i++)
            for (i64 c = 0; c < width; c++) {
                uint32_t lo = c < cin ? wb[2 * i * cin + c] : 0;
                uint32_t hi = c < cin && 2 * i + 1 < cout ? wb[(2 * i + 1) * cin + c] : 0;
                wq[i * width + c] = lo | hi << 16;
            }
    } else {
        const float *wf = w;
        float *wq = wp;
        for (i64 o = 0; o < cout; o++)
            for (i64 c = 0; c < width; c++)
                wq[o * width + c] = c < cin ? wf[o * cin + c] : 0.f;
    }
    pb_args q = {g, x, src ? src : acc, acc, ldg, ldx, src ? ldsrc : ldacc, ldacc, cin, cout, nvc, wp,
                 scale, shift, mean, k};
#pragma omp parallel num_threads(nt)
    {
        i64 lo, hi;
        row_range(rows, &lo, &hi);
        const int t = omp_get_thread_num();
        double *ps = p + (size_t)t * 2 * cin, *px = ps + cin;
        /* the weight gradient's tile: bf16 row pairs and g's pairs (wg_tile), or float32 rows */
        void *a = dw ? tiles + (size_t)t * tile : 0;
        uint32_t *gp = gps ? gps + (size_t)t * pairs : 0;
        (void)gp; /* read by wg_tile only: unused where this build has no bf16 */
        float *accw = dw ? sums + (size_t)t * (size_t)(cout * width) : 0;
        for (i64 r = lo; r < hi; r += PB_TILE) {
            i64 n = hi - r < PB_TILE ? hi - r : PB_TILE;
#if CONV_BF16
            if (dw && bf16)
                wg_tile(g, ldg, x, ldx, r, n, cin, cout, scale, shift, a, gp, accw);
#endif
            if (dw && !bf16)
                wf_tile((const float *)g + r * ldg, ldg, (const float *)x + r * ldx, ldx, n, cin, cout, scale, shift,
                        a, accw);
            /* a block of columns down the whole tile, then the next: the packed weights of those
             * columns (16 KiB for 128 outputs) and the tile's rows of g stay in L1 from one block
             * of rows to the next, where a layer's whole packed weight (56 KiB and more on
             * densenet121's wide layers) does not fit (up to 1.07x on the whole kernel, same
             * process, ad hoc; docs/performance.md) */
            for (i64 j = 0; j < nvc; j += PB_VECS) {
                int nv = nvc - j < PB_VECS ? (int)(nvc - j) : PB_VECS;
                for (i64 i = 0; i < n; i += PB_ROWS) {
                    int nr = n - i < PB_ROWS ? (int)(n - i) : PB_ROWS;
                    fns[nr - 1][nv - 1](&q, r + i, j, ps, px);
                }
            }
        }
#pragma omp barrier
        if (dw) {
            sum_thread_parts(sums, omp_get_num_threads(), cout, cin, width, dw);
        }
    }
    reduce_parts(p, nt, cin, 2 * cin, sum_d);
    reduce_parts(p + cin, nt, cin, 2 * cin, sum_dx);
    free(wp), free(sums), free(tiles), free(gps), free(p);
    return 0;
}
#else
#define CONV_F32 0
#define CONV_BF16 0
#endif

/* Which dtypes dk_conv3x3 takes in this build: float32 (1), bfloat16 (2). */
int dk_conv3x3_support(void)
{
    return CONV_F32 | CONV_BF16;
}

/* The convolution of float32 matrices, or with bf16 set of bfloat16 ones (wp as native.py packs
 * it for that dtype); 2 where this build has no such kernel. */
int dk_conv3x3(int bf16, const void *x, i64 ldx, i64 n, i64 h, i64 w, i64 cin, const float *wp, i64 cout, void *out,
               i64 ldo, int threads)
{
#if CONV_BF16
    if (bf16) {
        conv3x3(conv_bf16, x, ldx, n, h, w, cin, wp, cout, out, ldo, threads);
        return 0;
    }
#endif
#if CONV_F32
    if (!bf16) {
        conv3x3(conv_f32, x, ldx, n, h, w, cin, wp, cout, out, ldo, threads);
        return 0;
    }
#endif
    return 2;
}


/* The stem convolution (stem_conv) of float32 images, or with bf16 set of bfloat16 ones, into
 * out, (n*oh*ow, cout) contiguous; 2 where this build has no such kernel or cout is over
 * 16*STEM_VECS. */
int dk_stem_conv(int bf16, const void *x, i64 n, i64 cin, i64 h, i64 w, const float *wp, i64 cout, i64 kh, i64 kw,
                 i64 sy, i64 sx, i64 py, i64 px, i64 oh, i64 ow, void *out, int threads)
{
#if CONV_F32
    if (cout < 1 || cout > 16 * STEM_VECS)
        return 2;
    const stem_fn *fns = stem_f32;
#if CONV_BF16
    if (bf16)
        fns = stem_bf16;
#endif
    if (bf16 && fns == stem_f32)
        return 2;
    stem_conv(fns, bf16 ? 2 : 4, (const char *)x, n, cin, h, w, wp, cout, kh, kw, sy, sx, py, px, oh, ow,
              (char *)out, threads);
    return 0;
#else
    (void)bf16, (void)x, (void)n, (void)cin, (void)h, (void)w, (void)wp, (void)cout, (void)kh, (void)kw;
    (void)sy, (void)sx, (void)py, (void)px, (void)oh, (void)ow, (void)out, (void)threads;
    return 2;
#endif
}

/* The 1x1 convolution (pointwise) of float32 matrices, or with bf16 set of bfloat16 ones (wp as
 * native.py packs it; bias float32, 16*nv of it), of relu(x * scale + shift) where scale and
 * shift are given (float32, cin each); with idx (cin int64 columns of x's first xcols), of
 * x's columns idx, as dk_gather_cols reads them. 2 where this build has no such kernel or cout
 * is over PW_MAX_OUT, 3 for a column outside [0, xcols), -1 when out of memory. */
int dk_pointwise(int bf16, const void *x, i64 ldx, i64 rows, i64 cin, const float *wp, const float *bias, i64 cout,
                 int relu, void *out, i64 ldo, const float *scale, const float *shift, const i64 *idx, i64 xcols,
                 int threads)
{
#if CONV_F32
    if (cout < 1 || cout > PW_MAX_OUT || (!scale) != (!shift))
        return 2;
    const pw_fn (*fns)[3] = pw_f32;
#if CONV_BF16
    if (bf16)
        fns = pw_bf16;
#endif
    if (bf16 && fns == pw_f32)
        return 2;
    return pointwise(fns, bf16 ? 2 : 4, (const char *)x, ldx, rows, cin, wp, bias, cout, relu, (char *)out, ldo,
                     scale, shift, idx, xcols, threads);
#else
    (void)bf16, (void)x, (void)ldx, (void)rows, (void)cin, (void)wp, (void)bias, (void)cout, (void)relu;
    (void)out, (void)ldo, (void)scale, (void)shift, (void)idx, (void)xcols, (void)threads;
    return 2;
#endif
}

/* The backward of a 1x1 convolution of relu(x * scale + shift) and of that BN-ReLU's sums
 * (pointwise_backward): g (rows, cout), x and acc (rows, cin), src (or NULL) and w (cout, cin,
 * contiguous), float32 matrices or with bf16 set bfloat16 ones; float32 vectors and outputs;
 * dw NULL: no weight gradient. 2 where this build has no such kernel (AVX-512, and for
 * bfloat16 AVX512-BF16), -1 when out of memory. */
int dk_pointwise_backward(int bf16, const void *g, i64 ldg, const void *x, i64 ldx, i64 rows, i64 cin, i64 cout,
                          const void *w, const float *scale, const float *shift, const float *mean, const float *k,
                          void *acc, i64 ldacc, const void *src, i64 ldsrc, float *sum_d, float *sum_dx, float *dw,
                          int threads)
{
#if CONV_F32
    return pointwise_backward(bf16, g, ldg, x, ldx, rows, cin, cout, w, scale, shift, mean, k, acc, ldacc, src,
                              ldsrc, sum_d, sum_dx, dw, threads);
#else
    (void)bf16, (void)g, (void)ldg, (void)x, (void)ldx, (void)rows, (void)cin, (void)cout, (void)w, (void)scale, (void)shift;
    (void)mean, (void)k, (void)acc, (void)ldacc, (void)src, (void)ldsrc, (void)sum_d, (void)sum_dx, (void)dw;
    (void)threads;
    return 2;
#endif
}

/* A frozen dense block's layers for inference, in one call instead of two from Python per
 * layer (each of which costs 10-20 us of Python and ctypes, as much as the arithmetic of a
 * small batch): for layer i, dk_pointwise of relu(x * scale + shift) with its bias and a ReLU,
 * where x is the first c0 + i*k columns of rows (n*h*w rows, leading dimension ld), or idx of
 * them, into mid (contiguous, width_i columns); then dk_conv3x3 of mid into rows' k columns
 * after those. table holds six pointers per layer (the packed 1x1 weight, its bias, scale,
 * shift, idx or NULL, the packed 3x3 weight), dims two numbers (the columns read, width_i).
 * 0, or the first failing kernel's code. */
int dk_dense_layers(int bf16, void *rows, i64 ld, i64 n, i64 h, i64 w, i64 c0, i64 k, i64 layers, const i64 *dims,
                    void *const *table, void *mid, int threads)
{
    const i64 esize = bf16 ? 2 : 4;
    for (i64 i = 0; i < layers; i++) {
        void *const *p = table + 6 * i;
        const i64 cin = dims[2 * i], width = dims[2 * i + 1], cols = c0 + i * k;
        int code = dk_pointwise(bf16, rows, ld, n * h * w, cin, (const float *)p[0], (const float *)p[1], width, 1,
                                mid, width, (const float *)p[2], (const float *)p[3], (const i64 *)p[4], cols,
                                threads);
        if (!code)
            code = dk_conv3x3(bf16, mid, width, n, h, w, width, (const float *)p[5], k, (char *)rows + cols * esize,
                              ld, threads);
        if (code)
            return code;
    }
    return 0;
}
#endif

/* The second pass: the kernels again, for bfloat16 matrices. */
#ifndef DK_BF16
#define DK_BF16
#include "native.c"
#endif
