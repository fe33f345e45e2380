/*
 * Attention with SAM's decomposed relative-position bias, float32, AVX-512.
 *
 * For each (window, head) and query t = (qy, qx) of the window's H x W tokens:
 *
 *     out[t] = softmax_j(scale * q[t] . k[j] + q[t] . Rh[qy - jy + H - 1] + q[t] . Rw[qx - jx + W - 1]) @ v
 *
 * over the window's keys j = (jy, jx), with Rh and Rw the layer's
 * relative-position tables (a global block is one window over the image).
 * This is keras-hub's MultiHeadAttentionWithRelativePE after the qkv
 * projection, for head sizes that are multiples of 16 up to 80 (SAM's ViT-B
 * and ViT-L have 64, ViT-H 80). torch's CPU attention takes such a bias only
 * as a dense (queries x keys) mask, built and then read from memory for every
 * block (12 x 4096 x 4096 floats for a ViT-B global block); here each query's
 * products with the two tables (2H - 1 and 2W - 1 rows) are computed once and
 * added while its scores are in cache, and all products run in
 * register-blocked micro-kernels.
 *
 * Work is split into items of (window x head, tile of TQ queries); the
 * caller runs ranges of items on its own threads (no OpenMP runtime beside
 * torch's). Each row of scores is complete before its softmax (a tile's
 * scores fit in L2), so there is no online rescaling.
 *
 * Built at run time by sam_backend/sam/attention_kernel.py; only run on CPUs
 * with AVX-512F.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_D 80  /* largest head size (five vectors) */
#ifndef TQ
#define TQ 64     /* queries per tile (their scores stay in L2) */
#endif
#define KB 32     /* keys per score micro-kernel step (two vectors) */
#ifndef VB
#define VB 128    /* value rows per block of the value product (32 KiB) */
#endif

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* exp(x) for float32 x, accurate to a few ulp: 2^n * p(r) with r = x - n ln2. */
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* exp underflows to 0 below */
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    /* Taylor terms up to r^7 / 7!: |r| <= 0.35, so the remainder is below 1e-8. */
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Scores of 8 packed queries (qs: 8 x d) against one panel of KB keys (d x KB): s[r * ks + 0..KB). */
static inline void scores8(const float *qs, int d, const float *panel, float *s, int64_t ks) {
    __m512 a00 = _mm512_setzero_ps(), a01 = _mm512_setzero_ps();
    __m512 a10 = _mm512_setzero_ps(), a11 = _mm512_setzero_ps();
    __m512 a20 = _mm512_setzero_ps(), a21 = _mm512_setzero_ps();
    __m512 a30 = _mm512_setzero_ps(), a31 = _mm512_setzero_ps();
    __m512 a40 = _mm512_setzero_ps(), a41 = _mm512_setzero_ps();
    __m512 a50 = _mm512_setzero_ps(), a51 = _mm512_setzero_ps();
    __m512 a60 = _mm512_setzero_ps(), a61 = _mm512_setzero_ps();
    __m512 a70 = _mm512_setzero_ps(), a71 = _mm512_setzero_ps();
    for (int c = 0; c < d; c++) {
        __m512 b0 = _mm512_load_ps(panel + c * KB), b1 = _mm512_load_ps(panel + c * KB + 16);
        __m512 q;
#define ROW(r) q = _mm512_set1_ps(qs[(r) * d + c]); \
               a##r##0 = _mm512_fmadd_ps(q, b0, a##r##0); a##r##1 = _mm512_fmadd_ps(q, b1, a##r##1);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7)
#undef ROW
    }
#define STORE(r) _mm512_storeu_ps(s + (r) * ks, a##r##0); _mm512_storeu_ps(s + (r) * ks + 16, a##r##1);
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5) STORE(6) STORE(7)
#undef STORE
}

/*
 * acc (4 rows x NV vectors, row stride 16 * NV) += p[4 rows, j0..j1) (row stride ks) @ vp[j0..j1)
 * (rows of 16 * NV floats). One copy per head size, so that the accumulators stay in registers.
 */
#define VALUES4(NV) \
static void values4_##NV(const float *p, int64_t ks, const float *vp, int64_t j0, int64_t j1, float *acc) { \
    __m512 a[4][NV]; \
    for (int r = 0; r < 4; r++) \
        for (int c = 0; c < NV; c++) a[r][c] = _mm512_load_ps(acc + (r * NV + c) * 16); \
    for (int64_t j = j0; j < j1; j++) { \
        __m512 w[4], x; \
        for (int r = 0; r < 4; r++) w[r] = _mm512_set1_ps(p[r * ks + j]); \
        for (int c = 0; c < NV; c++) { \
            x = _mm512_load_ps(vp + (j * NV + c) * 16); \
            for (int r = 0; r < 4; r++) a[r][c] = _mm512_fmadd_ps(w[r], x, a[r][c]); \
        } \
    } \
    for (int r = 0; r < 4; r++) \
        for (int c = 0; c < NV; c++) _mm512_store_ps(acc + (r * NV + c) * 16, a[r][c]); \
}
VALUES4(1) VALUES4(2) VALUES4(3) VALUES4(4) VALUES4(5)
#undef VALUES4

typedef void (*values_fn)(const float *, int64_t, const float *, int64_t, int64_t, float *);
static const values_fn VALUES[6] = {NULL, values4_1, values4_2, values4_3, values4_4, values4_5};

/* Where one tensor's rows of d floats are: see sam_rel_attention. */
typedef struct { int64_t batch, wrow, wcol, head, row, col; } layout;

/* Offset of head h of window (b, wr, wc); a token (y, x) of the window adds y * row + x * col. */
static inline int64_t base(const layout *l, int64_t b, int64_t wr, int64_t wc, int64_t h) {
    return b * l->batch + wr * l->wrow + wc * l->wcol + h * l->head;
}

/* Panels of KB transposed rows (d x KB each, zero beyond rows) of a (rows x d) matrix, row i at m + i * stride. */
static void pack_panels(const float *m, int64_t stride, int64_t rows, int64_t padded, int64_t d, float *panels) {
    for (int64_t i = 0; i < padded; i++) {
        float *column = panels + (i / KB) * (d * KB) + i % KB;
        for (int64_t c = 0; c < d; c++) column[c * KB] = i < rows ? m[i * stride + c] : 0.0f;
    }
}

/*
 * Work items [begin, end) of the grid (window, head, tile of TQ queries).
 *
 * The attention runs within windows of height x width tokens: wrows x wcols
 * of them per image, items = images x wrows x wcols, window (b, wr, wc) being
 * item (b * wrows + wr) * wcols + wc (a global block is one window per image).
 * Of an image's (wrows * height) x (wcols * width) token grid only the first
 * valid_h rows and valid_w columns are real: the others are padding, whose
 * key and value are pad_k and pad_v (per head, d apart; keras-hub pads the
 * normalised tokens with zeros, so they are the projection's bias). Padding
 * tokens are keys like any other, but are not queried, and not written.
 *
 * q, k, v, out: float32 rows of d contiguous floats (d: 16, 32, 48, 64 or 80).
 * strides holds, for q, k, v and out in turn, six strides in floats: image,
 * window row, window column, head, token row, token column. So windows of an
 * image, or heads of a fused qkv projection, are read and written in place.
 * table_h: (2 * height - 1) x d and table_w: (2 * width - 1) x d, contiguous:
 * the bias of query (qy, qx) against key (y, x) of its window is
 * q . table_h[qy - y + height - 1] + q . table_w[qx - x + width - 1]
 * (keras-hub's decomposed relative positions, from the unscaled query).
 * Returns 0, -1 when scratch memory could not be had, -2 for an unsupported d.
 */
int sam_rel_attention(
    const float *q, const float *k, const float *v, float *out,
    const int64_t *strides, int64_t wrows, int64_t wcols, int64_t valid_h, int64_t valid_w,
    const float *pad_k, const float *pad_v,
    const float *table_h, const float *table_w,
    int64_t heads, int64_t height, int64_t width, int64_t d, float scale,
    int64_t begin, int64_t end)
{
    if (d <= 0 || d > MAX_D || d % 16) return -2;
    const values_fn values4 = VALUES[d / 16];
    const layout *lq = (const layout *)strides, *lk = lq + 1, *lv = lq + 2, *lo = lq + 3;
    const int64_t tokens = height * width;
    const int64_t kp = round_up(tokens, KB);
    /* Rows of scores a multiple of 4 KiB apart would share L1 sets; a cache line more keeps them apart. */
    const int64_t ks = kp % 1024 ? kp : kp + 16;
    const int64_t tiles = (tokens + TQ - 1) / TQ;
    /* Relative positions: each query's products with every row of the two tables. */
    const int64_t ph = round_up(2 * height - 1, KB), pw = round_up(2 * width - 1, KB);
    float *kt = aligned_alloc(64, (size_t)(d * kp) * sizeof(float));
    float *vp = aligned_alloc(64, (size_t)(kp * d) * sizeof(float));
    float *s = aligned_alloc(64, (size_t)(TQ * ks) * sizeof(float));
    float *qs = aligned_alloc(64, (size_t)(TQ * d) * sizeof(float));
    float *acc = aligned_alloc(64, (size_t)(TQ * d) * sizeof(float));
    float *th = aligned_alloc(64, (size_t)(d * (ph + pw)) * sizeof(float));
    float *rel = aligned_alloc(64, (size_t)(TQ * (ph + pw) + 2 * round_up(width, 16)) * sizeof(float));
    if (!kt || !vp || !s || !qs || !acc || !th || !rel) {
        free(kt); free(vp); free(s); free(qs); free(acc); free(th); free(rel);
        return -1;
    }
    float *tw = th + d * ph, *rel_w = rel + TQ * ph, *rw = rel + TQ * (ph + pw);
    pack_panels(table_h, d, 2 * height - 1, ph, d, th);
    pack_panels(table_w, d, 2 * width - 1, pw, d, tw);
    const __mmask16 tail_w = (__mmask16)((1u << (width % 16)) - 1u);
    int64_t packed = -1;
    for (int64_t item = begin; item < end; item++) {
        const int64_t bh = item / tiles, tile = item % tiles;
        const int64_t n = bh / heads, h = bh % heads;
        const int64_t b = n / (wrows * wcols), wr = (n / wcols) % wrows, wc = n % wcols;
        /* The window's real rows and columns: its queries (row-major) are those. */
        const int64_t vh = valid_h - wr * height < height ? valid_h - wr * height : height;
        const int64_t vw = valid_w - wc * width < width ? valid_w - wc * width : width;
        if (bh != packed) {
            /* Keys (times the scale) as panels, values as rows (kp x d); beyond the tokens zero. */
            const float *kb = k + base(lk, b, wr, wc, h), *vb = v + base(lv, b, wr, wc, h);
            for (int64_t y = 0, j = 0; y < height; y++)
                for (int64_t x = 0; x < width; x++, j++) {
                    const int real = y < vh && x < vw;
                    const float *kr = real ? kb + y * lk->row + x * lk->col : pad_k + h * d;
                    float *panel = kt + (j / KB) * (d * KB) + j % KB;
                    for (int c = 0; c < d; c++) panel[c * KB] = kr[c] * scale;
                    memcpy(vp + j * d, real ? vb + y * lv->row + x * lv->col : pad_v + h * d, d * sizeof(float));
                }
            for (int64_t j = tokens; j < kp; j++) {
                float *panel = kt + (j / KB) * (d * KB) + j % KB;
                for (int c = 0; c < d; c++) panel[c * KB] = 0.0f;
                memset(vp + j * d, 0, d * sizeof(float));
            }
            packed = bh;
        }
        const int64_t t0 = tile * TQ, queries = vh * vw;
        if (t0 >= queries) continue;  /* a tile of padding only */
        const int rows = (int)(queries - t0 < TQ ? queries - t0 : TQ);
        const int padded = (rows + 7) / 8 * 8;
        const float *qb = q + base(lq, b, wr, wc, h);
        for (int64_t r = 0, y = t0 / vw, x = t0 % vw; r < padded; r++) {
            if (r < rows) {
                memcpy(qs + r * d, qb + y * lq->row + x * lq->col, d * sizeof(float));
                if (++x == vw) x = 0, y++;
            } else {
                memset(qs + r * d, 0, d * sizeof(float));
            }
        }
        /* Panel by panel, so that each stays in L1 for all the tile's queries. */
        for (int64_t j = 0; j < kp; j += KB)
            for (int r = 0; r < padded; r += 8) scores8(qs + r * d, (int)d, kt + j * d, s + r * ks + j, ks);
        for (int r = 0; r < padded; r += 8) {
            for (int64_t j = 0; j < ph; j += KB) scores8(qs + r * d, (int)d, th + j * d, rel + r * ph + j, ph);
            for (int64_t j = 0; j < pw; j += KB) scores8(qs + r * d, (int)d, tw + j * d, rel_w + r * pw + j, pw);
        }

        float inv[TQ];
        for (int64_t r = 0, qy = t0 / vw, qx = t0 % vw; r < rows; r++) {
            float *sr = s + r * ks;
            /* This query's bias terms: rh[y] = q . table_h[qy - y + H - 1], rw[x] likewise. */
            const float *rh = rel + r * ph + qy + height - 1, *pwr = rel_w + r * pw + qx + width - 1;
            for (int64_t x = 0; x < width; x++) rw[x] = pwr[-x];
            if (++qx == vw) qx = 0, qy++;
            /* Add the bias and find the row's maximum. */
            __m512 mx = _mm512_set1_ps(-__builtin_inff());
            for (int64_t y = 0; y < height; y++) {
                float *sy = sr + y * width;
                const __m512 bh_y = _mm512_set1_ps(rh[-y]);
                int64_t x = 0;
                for (; x + 16 <= width; x += 16) {
                    __m512 t = _mm512_add_ps(_mm512_loadu_ps(sy + x), _mm512_add_ps(bh_y, _mm512_loadu_ps(rw + x)));
                    _mm512_storeu_ps(sy + x, t);
                    mx = _mm512_max_ps(mx, t);
                }
                if (x < width) {
                    __m512 t = _mm512_add_ps(_mm512_maskz_loadu_ps(tail_w, sy + x),
                                             _mm512_add_ps(bh_y, _mm512_maskz_loadu_ps(tail_w, rw + x)));
                    _mm512_mask_storeu_ps(sy + x, tail_w, t);
                    mx = _mm512_mask_max_ps(mx, tail_w, mx, t);
                }
            }
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            /* Exponentials in place, their sum; padded keys get 0. */
            __m512 sum = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 16 <= tokens; j += 16) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + j), m));
                _mm512_storeu_ps(sr + j, e);
                sum = _mm512_add_ps(sum, e);
            }
            if (j < tokens) {
                const __mmask16 tail = (__mmask16)((1u << (tokens - j)) - 1u);
                __m512 e = _mm512_maskz_mov_ps(tail, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sr + j), m)));
                _mm512_storeu_ps(sr + j, e);
                sum = _mm512_add_ps(sum, e);
                j += 16;
            }
            for (; j < kp; j += 16) _mm512_storeu_ps(sr + j, _mm512_setzero_ps());
            inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        for (int r = rows; r < padded; r++) {
            memset(s + r * ks, 0, (size_t)kp * sizeof(float));
            inv[r] = 0.0f;
        }
        /* Values block by block (VB rows of vp stay in L1 for all the tile's queries). */
        memset(acc, 0, sizeof(float) * TQ * d);
        for (int64_t j = 0; j < kp; j += VB) {
            const int64_t j1 = j + VB < kp ? j + VB : kp;
            for (int r = 0; r < rows; r += 4) values4(s + r * ks, ks, vp, j, j1, acc + r * d);
        }
        float *ob = out + base(lo, b, wr, wc, h);
        for (int64_t r = 0, y = t0 / vw, x = t0 % vw; r < rows; r++, x = x + 1 == vw ? (y++, 0) : x + 1) {
            float *orow = ob + y * lo->row + x * lo->col;
            const __m512 f = _mm512_set1_ps(inv[r]);
            for (int c = 0; c < d; c += 16)
                _mm512_storeu_ps(orow + c, _mm512_mul_ps(_mm512_load_ps(acc + r * d + c), f));
        }
    }
    free(kt); free(vp); free(s); free(qs); free(acc); free(th); free(rel);
    return 0;
}
