"""C source of the CPU int8 kernels, compiled on first use by ``native.py``.

Kept as a Python string so that every install (wheel, sdist, editable) carries it without
package-data configuration.
"""

ABI_VERSION = 1

SOURCE = r"""
/* eetq_lora CPU kernels. q is an int8 matrix [R, C] with unit column stride and row stride ldq;
   its dequantized value is q[r, c] * row_scale[r] * col_scale[c] (a NULL scale counts as 1).
   Activations and results are float32 (the callers cast). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define EETQ_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define EETQ_AVX2 1
#endif

typedef float vf __attribute__((vector_size(64)));
#define INLINE static inline __attribute__((always_inline))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
/* rowaxpy reads its share of rows in panels of this many bytes, which stay in L2 while every
   column tile sweeps them; the next panel is prefetched meanwhile. */
#define PANEL_BYTES 262144

int eetq_abi_version(void) { return 1; }

int eetq_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

INLINE vf load_q(const int8_t* p) {
#if defined(EETQ_AVX512)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(EETQ_AVX2)
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    vf v;
    memcpy(&v, &lo, 32);
    memcpy((char*)&v + 32, &hi, 32);
    return v;
#else
    vf v;
    for (int i = 0; i < 16; i++) v[i] = (float)p[i];
    return v;
#endif
}

INLINE vf load_f(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_f(float* p, vf v) { memcpy(p, &v, sizeof v); }
INLINE float hsum(vf v) { float s = 0.f; for (int i = 0; i < 16; i++) s += v[i]; return s; }

static uint16_t bf16_scalar(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Round-to-nearest-even float32 -> bfloat16; inputs are finite (an int8 times a finite scale). */
INLINE void store_bf16(uint16_t* dst, vf v) {
#if defined(EETQ_AVX512) && defined(__AVX512BF16__)
    __m256bh b = _mm512_cvtneps_pbh((__m512)v);
    memcpy(dst, &b, 32);
#elif defined(EETQ_AVX512)
    __m512i u = _mm512_castps_si512((__m512)v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
#else
    for (int i = 0; i < 16; i++) dst[i] = bf16_scalar(v[i]);
#endif
}

static int thread_count(int requested) {
#ifdef _OPENMP
    return requested > 0 ? requested : omp_get_max_threads();
#else
    (void)requested;
    return 1;
#endif
}

/* out[m, r0 + j] = row_scale[r0 + j] * sum_c a[m, c] * q[r0 + j, c] for RB rows of q and MB rows of a. */
INLINE void rowdot_block(int RB, int MB, const float* a, int64_t lda, const int8_t* q, int64_t ldq, int64_t C,
                         const float* row_scale, float* out, int64_t ldo, int64_t r0, int64_t m0) {
    vf acc[4][4];
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < MB; i++) acc[r][i] = (vf){0};
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        vf w[4];
        for (int r = 0; r < RB; r++) w[r] = load_q(q + (r0 + r) * ldq + c);
        for (int i = 0; i < MB; i++) {
            vf x = load_f(a + (m0 + i) * lda + c);
            for (int r = 0; r < RB; r++) acc[r][i] += w[r] * x;
        }
    }
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < MB; i++) {
            float t = hsum(acc[r][i]);
            for (int64_t cc = c; cc < C; cc++) t += a[(m0 + i) * lda + cc] * (float)q[(r0 + r) * ldq + cc];
            out[(m0 + i) * ldo + r0 + r] = row_scale ? t * row_scale[r0 + r] : t;
        }
}

/* out[m, r] = row_scale[r] * sum_c a[m, c] * col_scale[c] * q[r, c]: out = a @ dequant(q)^T.
   Threads take contiguous runs of rows, so each streams its part of q once. Returns 0, -1 if out of memory. */
int eetq_rowdot(const float* a, int64_t M, int64_t lda, const int8_t* q, int64_t R, int64_t C, int64_t ldq,
                const float* row_scale, const float* col_scale, float* out, int64_t ldo, int nthreads) {
    float* scaled = NULL;
    if (col_scale) {
        scaled = (float*)malloc(sizeof(float) * (size_t)(M * C > 0 ? M * C : 1));
        if (!scaled) return -1;
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < C; c++) scaled[m * C + c] = a[m * lda + c] * col_scale[c];
        a = scaled;
        lda = C;
    }
    int64_t blocks = (R + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(thread_count(nthreads))
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r0 = 4 * b;
        int full = R - r0 >= 4;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int mb = (int)MIN(4, M - m0);
            if (full) {
                switch (mb) {
                case 4: rowdot_block(4, 4, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                case 3: rowdot_block(4, 3, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                case 2: rowdot_block(4, 2, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                default: rowdot_block(4, 1, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                }
            } else {
                for (int64_t r = r0; r < R; r++)
                    for (int i = 0; i < mb; i++) rowdot_block(1, 1, a, lda, q, ldq, C, row_scale, out, ldo, r, m0 + i);
            }
        }
    }
    free(scaled);
    return 0;
}

/* acc[i, c0 + j] (+)= sum_{r0 <= r < r1} g[i, r] * q[r, c0 + j] for MB rows of g and 16 * CV columns,
   accumulated in registers; the first column tile of a panel also prefetches the next panel. */
INLINE void axpy_tile(int MB, int CV, const float* g, int64_t ldg, const int8_t* q, int64_t ldq, int64_t r0,
                      int64_t r1, int64_t c0, float* acc, int64_t ldacc, int first, const int8_t** pf,
                      const int8_t* pf_end) {
    vf s[4][8];
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < CV; v++) s[i][v] = first ? (vf){0} : load_f(acc + i * ldacc + c0 + 16 * v);
    for (int64_t r = r0; r < r1; r++) {
        const int8_t* row = q + r * ldq + c0;
        vf w[8];
        for (int v = 0; v < CV; v++) w[v] = load_q(row + 16 * v);
        if (pf)
            for (int l = 0; l < CV; l += 4)
                if (*pf < pf_end) {
                    __builtin_prefetch(*pf, 0, 2);
                    *pf += 64;
                }
        for (int i = 0; i < MB; i++) {
            float gi = g[i * ldg + r];
            for (int v = 0; v < CV; v++) s[i][v] += gi * w[v];
        }
    }
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < CV; v++) store_f(acc + i * ldacc + c0 + 16 * v, s[i][v]);
}

static void axpy_panel(const float* g, int64_t M, int64_t ldg, const int8_t* q, int64_t ldq, int64_t C, int64_t r0,
                       int64_t r1, float* acc, int first, const int8_t* pf, const int8_t* pf_end) {
    int wide = M <= 2;
    int64_t step = wide ? 128 : 64, c0 = 0;
    for (; c0 + step <= C; c0 += step) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int mb = (int)MIN(4, M - m0);
            const float* gm = g + m0 * ldg;
            float* am = acc + m0 * C;
            const int8_t** p = m0 == 0 ? &pf : NULL;
            if (wide) {
                if (mb == 1) axpy_tile(1, 8, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end);
                else axpy_tile(2, 8, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end);
            } else {
                switch (mb) {
                case 4: axpy_tile(4, 4, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                case 3: axpy_tile(3, 4, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                case 2: axpy_tile(2, 4, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                default: axpy_tile(1, 4, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                }
            }
        }
    }
    for (; c0 + 16 <= C; c0 += 16)
        for (int64_t m = 0; m < M; m++)
            axpy_tile(1, 1, g + m * ldg, ldg, q, ldq, r0, r1, c0, acc + m * C, C, first, NULL, NULL);
    for (; c0 < C; c0++)
        for (int64_t m = 0; m < M; m++) {
            float t = first ? 0.f : acc[m * C + c0];
            for (int64_t r = r0; r < r1; r++) t += g[m * ldg + r] * (float)q[r * ldq + c0];
            acc[m * C + c0] = t;
        }
}

/* out[m, c] = col_scale[c] * sum_r a[m, r] * row_scale[r] * q[r, c]: out = a @ dequant(q).
   Threads take contiguous runs of rows into private partial sums, added up at the end.
   Returns 0, -1 if out of memory. */
int eetq_rowaxpy(const float* a, int64_t M, int64_t lda, const int8_t* q, int64_t R, int64_t C, int64_t ldq,
                 const float* row_scale, const float* col_scale, float* out, int64_t ldo, int nthreads) {
    int T = thread_count(nthreads);
    size_t partial_size = (size_t)T * M * C, g_size = (size_t)M * R;
    float* partial = (float*)malloc(sizeof(float) * (partial_size + g_size > 0 ? partial_size + g_size : 1));
    if (!partial) return -1;
    float* g = partial + partial_size;
    for (int64_t m = 0; m < M; m++)
        for (int64_t r = 0; r < R; r++) g[m * R + r] = a[m * lda + r] * (row_scale ? row_scale[r] : 1.f);
    int64_t panel = PANEL_BYTES / (C > 0 ? C : 1);
    if (panel < 4) panel = 4;
    #pragma omp parallel num_threads(T)
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int t = 0, nt = 1;
#endif
        float* acc = partial + (int64_t)t * M * C;
        int64_t ra = R * t / nt, rb = R * (t + 1) / nt;
        if (ra == rb) memset(acc, 0, sizeof(float) * M * C);
        for (int64_t r0 = ra; r0 < rb; r0 += panel) {
            int64_t r1 = MIN(rb, r0 + panel), r2 = MIN(rb, r1 + panel);
            axpy_panel(g, M, R, q, ldq, C, r0, r1, acc, r0 == ra, q + r1 * ldq, q + r2 * ldq);
        }
        #pragma omp barrier
        int64_t total = M * C, e0 = total * t / nt, e1 = total * (t + 1) / nt;
        for (int64_t e = e0; e < e1; e++) {
            float v = 0.f;
            for (int u = 0; u < nt; u++) v += partial[(int64_t)u * total + e];
            int64_t m = e / C, c = e % C;
            out[m * ldo + c] = col_scale ? v * col_scale[c] : v;
        }
    }
    free(partial);
    return 0;
}

/* out[r, c] = q[r, c] * row_scale[r] * col_scale[c], stored as float32 (out_bf16 == 0) or bfloat16 bits. */
void eetq_dequant(const int8_t* q, int64_t ldq, int64_t R, int64_t C, const float* row_scale, const float* col_scale,
                  void* out, int64_t ldo, int out_bf16, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(thread_count(nthreads))
    for (int64_t r = 0; r < R; r++) {
        const int8_t* src = q + r * ldq;
        float rs = row_scale ? row_scale[r] : 1.f;
        int64_t c = 0;
        if (out_bf16) {
            uint16_t* dst = (uint16_t*)out + r * ldo;
            for (; c + 16 <= C; c += 16) {
                vf v = load_q(src + c) * rs;
                if (col_scale) v *= load_f(col_scale + c);
                store_bf16(dst + c, v);
            }
            for (; c < C; c++) dst[c] = bf16_scalar((float)src[c] * rs * (col_scale ? col_scale[c] : 1.f));
        } else {
            float* dst = (float*)out + r * ldo;
            for (; c + 16 <= C; c += 16) {
                vf v = load_q(src + c) * rs;
                if (col_scale) v *= load_f(col_scale + c);
                store_f(dst + c, v);
            }
            for (; c < C; c++) dst[c] = (float)src[c] * rs * (col_scale ? col_scale[c] : 1.f);
        }
    }
}
"""
