/* eetq_lora's CPU int8 kernels, compiled on first use by cpu_library.py and loaded with ctypes
   (native.py makes the checked calls). q is an int8 matrix [R, C] with unit column stride and row
   stride ldq; its dequantized value is q[r, c] * row_scale[r] * col_scale[c] (a NULL scale counts
   as 1). Activations and results are float32 unless a function says otherwise. */

/* Version of the exported functions' signatures: change it with any of them (cpu_library.py reads
   it from this line and refuses a library that reports another). */
#define EETQ_ABI_VERSION 7

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

/* vf is one vector register of VW floats: 16 with AVX-512, 8 with AVX, else 4. A vector type wider
   than the target's registers would be compiled into loads and stores through the stack. */
#if defined(EETQ_AVX512)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
typedef float vf __attribute__((vector_size(4 * VW)));
typedef uint32_t vu __attribute__((vector_size(4 * VW)));
#define INLINE static inline __attribute__((always_inline))
/* OpenMP directives; without OpenMP they vanish and every loop runs on the calling thread. */
#ifdef _OPENMP
#define OMP(directive) _Pragma(#directive)
#else
#define OMP(directive)
#endif
#define MIN(a, b) ((a) < (b) ? (a) : (b))

/* Tile shapes, in vectors, sized to the registers: AVX-512 has 32, the other targets 16.
   rowdot multiplies DOT_ROWS_ONE weight rows at once by a single activation row, else DOT_ROWS
   weight rows by up to 4 activation rows.
   rowaxpy sweeps panels (below) with register tiles: AXPY_CV_FEW column vectors for one or two
   activation rows, else, for each run of up to 4 activation rows, strips of AXPY_STRIP column
   vectors in tiles of AXPY_CV(rows in the run) vectors. Where AXPY_STREAM is set it instead
   streams whole weight rows for one to three activation rows (axpy_stream). */
#if VW == 16
#define DOT_ROWS_ONE 8
#define DOT_ROWS 4
#define AXPY_CV_FEW 8
#define AXPY_STRIP 4
#define AXPY_CV(rows) 4
#define PANEL_MIN_ROWS 4
#else
#define DOT_ROWS_ONE 4
#define DOT_ROWS 3
#define AXPY_STREAM 1
#define AXPY_CV_FEW 4
#define AXPY_STRIP 6
#define AXPY_CV(rows) ((rows) == 4 ? 2 : (rows) == 1 ? 6 : 3)
#define PANEL_MIN_ROWS 32
#endif
/* rowaxpy's panels: a thread's rows in runs of this many bytes, which stay in L2 while every column
   tile sweeps them and the next panel is prefetched. With a single activation row there is too
   little work per byte to hide a large panel's prefetch, hence the smaller panel. A panel has at
   least PANEL_MIN_ROWS rows, or a tile's loads and stores of its sums outweigh its work. */
#define PANEL_BYTES 262144
#define PANEL_BYTES_ONE_ROW 65536
/* axpy_stream prefetches the weight this many bytes ahead of its reads, in address order, without
   polluting the caches (it reads each byte once). Its reads hop between RB rows, a pattern the
   hardware prefetchers follow poorly: on a 2-core AVX2 EPYC a single thread read cold weights at
   7 GB/s without it and 17 GB/s with it (distances of 8 and 32 KiB gave 13 and 17 GB/s). */
#define STREAM_PREFETCH 16384
/* rowdot prefetches each weight row this many bytes ahead of its reads. */
#define ROW_PREFETCH 2048
/* Without AVX-512, rowdot prefetches the next block of rows instead where a block is at most this
   many bytes: short rows end before the hardware prefetcher has found their streams. */
#define NEXT_BLOCK_PREFETCH_MAX 65536

int eetq_abi_version(void) { return EETQ_ABI_VERSION; }

#if defined(EETQ_AVX512) && defined(__AVX512BF16__)
#define EETQ_BF16_DOT 1
#endif

int eetq_has_bf16_dot(void) {
#ifdef EETQ_BF16_DOT
    return 1;
#else
    return 0;
#endif
}

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
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#else
    vf v;
    for (int i = 0; i < VW; i++) v[i] = (float)p[i];
    return v;
#endif
}

/* a * b + c, rounded once where the target has fused multiply-adds. Spelled out rather than left
   to the compiler's contraction, which it skips in some loops: every kernel then sums the same
   products in the same order whatever tile it runs. */
INLINE float fmadd1(float a, float b, float c) {
#if defined(__FMA__) || defined(__FP_FAST_FMAF)
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

INLINE vf fmadd(vf a, vf b, vf c) {
#if defined(EETQ_AVX512)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(EETQ_AVX2) && defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

INLINE vf load_f(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void store_f(float* p, vf v) { memcpy(p, &v, sizeof v); }
INLINE vf splat(float x) {
#if VW == 16
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#elif VW == 8
    return (vf){x, x, x, x, x, x, x, x};
#else
    return (vf){x, x, x, x};
#endif
}
INLINE float hsum(vf v) { float s = 0.f; for (int i = 0; i < VW; i++) s += v[i]; return s; }
/* A tree sum (a different order from hsum's), for the LoRA adapter's dot products. */
INLINE float tree_sum(vf v) {
#if defined(EETQ_AVX512)
    return _mm512_reduce_add_ps((__m512)v);
#else
    for (int width = VW / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) v[i] += v[i + width];
    return v[0];
#endif
}

/* Round-to-nearest-even float32 -> bfloat16 bits. A NaN becomes torch's quiet NaN 0x7FC0: the
   rounding add would carry a NaN with a full mantissa (0x7FFFFFFF, say) into the sign bit or
   past it, to infinity or zero. */
static uint16_t bf16_scalar(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* bfloat16 bits -> float32 (exact). */
static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round-to-nearest-even float32 -> bfloat16, NaN to 0x7FC0 as in bf16_scalar. */
INLINE void store_bf16(uint16_t* dst, vf v) {
#if defined(EETQ_AVX512) && defined(__AVX512BF16__)
    __m256bh b = _mm512_cvtneps_pbh((__m512)v);
    memcpy(dst, &b, 32);
#elif defined(EETQ_AVX512)
    __m512i u = _mm512_castps_si512((__m512)v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i*)dst, _mm512_cvtepi32_epi16(u));
#else
    for (int i = 0; i < VW; i++) dst[i] = bf16_scalar(v[i]);
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

/* acc[r][i] += q[r0 + r, c + k] * a[m0 + i, c + k] for one vector of columns c + k. */
INLINE void rowdot_step(int RB, int MB, vf acc[8][4], const float* a, int64_t lda, const int8_t* q, int64_t ldq,
                        int64_t r0, int64_t m0, int64_t c) {
    vf w[8];
    for (int r = 0; r < RB; r++) w[r] = load_q(q + (r0 + r) * ldq + c);
    for (int i = 0; i < MB; i++) {
        vf x = load_f(a + (m0 + i) * lda + c);
        for (int r = 0; r < RB; r++) acc[r][i] = fmadd(w[r], x, acc[r][i]);
    }
}

/* out[m, r0 + j] = row_scale[r0 + j] * sum_c a[m, c] * q[r0 + j, c] for RB rows of q and MB rows of a.
   Each product is summed in lane c % VW in column order, then the lanes in order: the result for
   a row does not depend on RB or MB. */
INLINE void rowdot_block(int RB, int MB, const float* a, int64_t lda, const int8_t* q, int64_t ldq, int64_t C,
                         const float* row_scale, float* out, int64_t ldo, int64_t r0, int64_t m0) {
    vf acc[8][4];
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < MB; i++) acc[r][i] = (vf){0};
#if VW == 16
    const int64_t ahead = ROW_PREFETCH;
#else
    const int64_t ahead = RB * ldq <= NEXT_BLOCK_PREFETCH_MAX ? RB * ldq : ROW_PREFETCH;
#endif
    int64_t c = 0;
    for (; c + 64 <= C; c += 64) {
        if (m0 == 0)
            for (int r = 0; r < RB; r++) __builtin_prefetch(q + (r0 + r) * ldq + c + ahead, 0, 2);
        for (int k = 0; k < 64; k += VW) rowdot_step(RB, MB, acc, a, lda, q, ldq, r0, m0, c + k);
    }
    for (; c + VW <= C; c += VW) rowdot_step(RB, MB, acc, a, lda, q, ldq, r0, m0, c);
    for (int r = 0; r < RB; r++)
        for (int i = 0; i < MB; i++) {
            float t = hsum(acc[r][i]);
            for (int64_t cc = c; cc < C; cc++) t = fmadd1(a[(m0 + i) * lda + cc], (float)q[(r0 + r) * ldq + cc], t);
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
    /* A single activation row gives each weight row one accumulator chain, so more weight rows are
       streamed at once to keep enough loads and multiply-adds in flight. */
    int rows = M == 1 ? DOT_ROWS_ONE : DOT_ROWS;
    int64_t blocks = (R + rows - 1) / rows;
    (void)nthreads; /* read only by the OpenMP directive */
    OMP(omp parallel for schedule(static) num_threads(thread_count(nthreads)))
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r0 = rows * b;
        int full = R - r0 >= rows;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int mb = (int)MIN(4, M - m0);
            if (full && M == 1) {
                rowdot_block(DOT_ROWS_ONE, 1, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0);
            } else if (full) {
                switch (mb) {
                case 4: rowdot_block(DOT_ROWS, 4, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                case 3: rowdot_block(DOT_ROWS, 3, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                case 2: rowdot_block(DOT_ROWS, 2, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
                default: rowdot_block(DOT_ROWS, 1, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
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

/* rowaxpy sums each column's products in row order, one fused multiply-add at a time, in every
   variant below: a thread's partial result does not depend on M or the tile shapes. */

/* acc[i, c0 + j] (+)= sum_{r0 <= r < r1} g[i, r] * q[r, c0 + j] for MB rows of g and VW * CV columns,
   accumulated in registers; the first column tile of a panel also prefetches the next panel. */
INLINE void axpy_tile(int MB, int CV, const float* g, int64_t ldg, const int8_t* q, int64_t ldq, int64_t r0,
                      int64_t r1, int64_t c0, float* acc, int64_t ldacc, int first, const int8_t** pf,
                      const int8_t* pf_end) {
    vf s[4][8];
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < CV; v++) s[i][v] = first ? (vf){0} : load_f(acc + i * ldacc + c0 + VW * v);
    for (int64_t r = r0; r < r1; r++) {
        const int8_t* row = q + r * ldq + c0;
        vf w[8];
        for (int v = 0; v < CV; v++) w[v] = load_q(row + VW * v);
        if (pf)
            for (int l = 0; l < CV * VW; l += 64)
                if (*pf < pf_end) {
                    __builtin_prefetch(*pf, 0, 2);
                    *pf += 64;
                }
        for (int i = 0; i < MB; i++) {
            vf gi = splat(g[i * ldg + r]);
            for (int v = 0; v < CV; v++) s[i][v] = fmadd(gi, w[v], s[i][v]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < CV; v++) store_f(acc + i * ldacc + c0 + VW * v, s[i][v]);
}

// Thread t's share of summing the nt per-thread partial [M, C] results into out (scaled per column).
static void reduce_partials(const float* partial, int nt, int t, int64_t M, int64_t C, const float* col_scale,
                            float* out, int64_t ldo) {
    int64_t total = M * C, e0 = total * t / nt, e1 = total * (t + 1) / nt;
    for (int64_t e = e0; e < e1; e++) {
        float v = 0.f;
        for (int u = 0; u < nt; u++) v += partial[(int64_t)u * total + e];
        int64_t m = e / C, c = e % C;
        out[m * ldo + c] = col_scale ? v * col_scale[c] : v;
    }
}

/* axpy_tile over AXPY_STRIP column vectors from c0, CV at a time. */
INLINE void axpy_strip(int MB, int CV, const float* g, int64_t ldg, const int8_t* q, int64_t ldq, int64_t r0,
                       int64_t r1, int64_t c0, float* acc, int64_t ldacc, int first, const int8_t** pf,
                       const int8_t* pf_end) {
    for (int v = 0; v < AXPY_STRIP; v += CV)
        axpy_tile(MB, CV, g, ldg, q, ldq, r0, r1, c0 + VW * v, acc, ldacc, first, pf, pf_end);
}

static void axpy_panel(const float* g, int64_t M, int64_t ldg, const int8_t* q, int64_t ldq, int64_t C, int64_t r0,
                       int64_t r1, float* acc, int first, const int8_t* pf, const int8_t* pf_end) {
    int few = M <= 2;
    int64_t step = VW * (few ? AXPY_CV_FEW : AXPY_STRIP), c0 = 0;
    for (; c0 + step <= C; c0 += step) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int mb = (int)MIN(4, M - m0);
            const float* gm = g + m0 * ldg;
            float* am = acc + m0 * C;
            const int8_t** p = m0 == 0 ? &pf : NULL;
            if (few) {
                if (mb == 1) axpy_tile(1, AXPY_CV_FEW, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end);
                else axpy_tile(2, AXPY_CV_FEW, gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end);
            } else {
                switch (mb) {
                case 4: axpy_strip(4, AXPY_CV(4), gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                case 3: axpy_strip(3, AXPY_CV(3), gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                case 2: axpy_strip(2, AXPY_CV(2), gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                default: axpy_strip(1, AXPY_CV(1), gm, ldg, q, ldq, r0, r1, c0, am, C, first, p, pf_end); break;
                }
            }
        }
    }
    for (; c0 + VW <= C; c0 += VW)
        for (int64_t m = 0; m < M; m++)
            axpy_tile(1, 1, g + m * ldg, ldg, q, ldq, r0, r1, c0, acc + m * C, C, first, NULL, NULL);
    for (; c0 < C; c0++)
        for (int64_t m = 0; m < M; m++) {
            float t = first ? 0.f : acc[m * C + c0];
            for (int64_t r = r0; r < r1; r++) t = fmadd1(g[m * ldg + r], (float)q[r * ldq + c0], t);
            acc[m * C + c0] = t;
        }
}

#ifdef AXPY_STREAM
/* acc[i, c] += sum_{r0 <= r < r1} g[i, r] * q[r, c] for MB rows of g, reading RB rows of q at a time
   from start to end (sequential streams the hardware prefetcher follows), CV column vectors per step. */
INLINE void axpy_stream(int MB, int RB, int CV, const float* g, int64_t ldg, const int8_t* q, int64_t ldq, int64_t C,
                        int64_t r0, int64_t r1, float* acc, int64_t ldacc) {
    int64_t r = r0;
    const int8_t* end = q + r1 * ldq;
    for (; r + RB <= r1; r += RB) {
        vf gv[3][8];
        for (int m = 0; m < MB; m++)
            for (int i = 0; i < RB; i++) gv[m][i] = splat(g[m * ldg + r + i]);
        const int8_t* rows = q + r * ldq;
        /* Each column step reads RB * CV * VW bytes of this block of rows: prefetch as many, in order. */
        const int8_t* pf = rows + STREAM_PREFETCH;
        int pf_due = 0;
        int64_t c = 0;
        for (; c + CV * VW <= C; c += CV * VW) {
            for (pf_due += RB * CV * VW; pf_due >= 64 && pf < end; pf_due -= 64, pf += 64) __builtin_prefetch(pf, 0, 0);
            vf s[3][4];
            for (int m = 0; m < MB; m++)
                for (int v = 0; v < CV; v++) s[m][v] = load_f(acc + m * ldacc + c + VW * v);
            for (int i = 0; i < RB; i++)
                for (int v = 0; v < CV; v++) {
                    vf w = load_q(rows + i * ldq + c + VW * v);
                    for (int m = 0; m < MB; m++) s[m][v] = fmadd(gv[m][i], w, s[m][v]);
                }
            for (int m = 0; m < MB; m++)
                for (int v = 0; v < CV; v++) store_f(acc + m * ldacc + c + VW * v, s[m][v]);
        }
        for (; c + VW <= C; c += VW)
            for (int m = 0; m < MB; m++) {
                vf s = load_f(acc + m * ldacc + c);
                for (int i = 0; i < RB; i++) s = fmadd(gv[m][i], load_q(rows + i * ldq + c), s);
                store_f(acc + m * ldacc + c, s);
            }
        for (; c < C; c++)
            for (int m = 0; m < MB; m++) {
                float t = acc[m * ldacc + c];
                for (int i = 0; i < RB; i++) t = fmadd1(g[m * ldg + r + i], (float)rows[i * ldq + c], t);
                acc[m * ldacc + c] = t;
            }
    }
    for (; r < r1; r++)
        for (int m = 0; m < MB; m++) {
            const int8_t* row = q + r * ldq;
            float* am = acc + m * ldacc;
            vf gv = splat(g[m * ldg + r]);
            int64_t c = 0;
            for (; c + VW <= C; c += VW) store_f(am + c, fmadd(gv, load_q(row + c), load_f(am + c)));
            for (; c < C; c++) am[c] = fmadd1(g[m * ldg + r], (float)row[c], am[c]);
        }
}
#endif

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
    int64_t panel = (M == 1 ? PANEL_BYTES_ONE_ROW : PANEL_BYTES) / (C > 0 ? C : 1);
    if (panel < PANEL_MIN_ROWS) panel = PANEL_MIN_ROWS;
    OMP(omp parallel num_threads(T))
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int t = 0, nt = 1;
#endif
        float* acc = partial + (int64_t)t * M * C;
        int64_t ra = R * t / nt, rb = R * (t + 1) / nt;
#ifdef AXPY_STREAM
        if (M >= 1 && M <= 3) {
            /* Shapes that fit the 16 registers: M * RB splatted activations and M * CV sums. */
            memset(acc, 0, sizeof(float) * M * C);
            if (M == 1)
                axpy_stream(1, 8, 4, g, R, q, ldq, C, ra, rb, acc, C);
            else if (M == 2)
                axpy_stream(2, 3, 2, g, R, q, ldq, C, ra, rb, acc, C);
            else
                axpy_stream(3, 4, 1, g, R, q, ldq, C, ra, rb, acc, C);
        } else
#endif
        {
            if (ra == rb) memset(acc, 0, sizeof(float) * M * C);
            /* The first panel has no earlier one to prefetch it: fetch it in order before its column
               tiles hop rows. */
            for (const int8_t* p = q + ra * ldq; p < q + MIN(rb, ra + panel) * ldq; p += 64) __builtin_prefetch(p, 0, 2);
            for (int64_t r0 = ra; r0 < rb; r0 += panel) {
                int64_t r1 = MIN(rb, r0 + panel), r2 = MIN(rb, r1 + panel);
                axpy_panel(g, M, R, q, ldq, C, r0, r1, acc, r0 == ra, q + r1 * ldq, q + r2 * ldq);
            }
        }
        OMP(omp barrier)
        reduce_partials(partial, nt, t, M, C, col_scale, out, ldo);
    }
    free(partial);
    return 0;
}

/* out[r, c] = q[r, c] * row_scale[r] * col_scale[c], stored as float32 (out_bf16 == 0) or bfloat16 bits. */
void eetq_dequant(const int8_t* q, int64_t ldq, int64_t R, int64_t C, const float* row_scale, const float* col_scale,
                  void* out, int64_t ldo, int out_bf16, int nthreads) {
    (void)nthreads; /* read only by the OpenMP directive */
    OMP(omp parallel for schedule(static) num_threads(thread_count(nthreads)))
    for (int64_t r = 0; r < R; r++) {
        const int8_t* src = q + r * ldq;
        float rs = row_scale ? row_scale[r] : 1.f;
        int64_t c = 0;
        if (out_bf16) {
            uint16_t* dst = (uint16_t*)out + r * ldo;
            for (; c + VW <= C; c += VW) {
                vf v = load_q(src + c) * rs;
                if (col_scale) v *= load_f(col_scale + c);
                store_bf16(dst + c, v);
            }
            for (; c < C; c++) dst[c] = bf16_scalar((float)src[c] * rs * (col_scale ? col_scale[c] : 1.f));
        } else {
            float* dst = (float*)out + r * ldo;
            for (; c + VW <= C; c += VW) {
                vf v = load_q(src + c) * rs;
                if (col_scale) v *= load_f(col_scale + c);
                store_f(dst + c, v);
            }
            for (; c < C; c++) dst[c] = (float)src[c] * rs * (col_scale ? col_scale[c] : 1.f);
        }
    }
}

/* Exact float16 -> float32 (normal, subnormal, zero, inf, nan). */
static float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        int shift = 0;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            shift++;
        }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round-to-nearest-even float32 -> float16 bits: overflow to infinity, subnormal results, NaN kept. */
static uint16_t f16_scalar(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t magnitude = u & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return sign | 0x7E00u;
    if (magnitude >= 0x477FF000u) return sign | 0x7C00u; /* 65520 and up round to infinity */
    if (magnitude >= 0x38800000u) {                      /* a normal float16 */
        magnitude += 0xFFFu + ((magnitude >> 13) & 1u);
        return sign | (uint16_t)((magnitude >> 13) - (112u << 10));
    }
    /* Subnormal or zero: the multiple of 2^-24, rounded to nearest even by adding 2^23 in float. */
    float scaled;
    memcpy(&scaled, &magnitude, 4);
    float shifted = scaled * 16777216.0f + 8388608.0f;
    return sign | (uint16_t)(shifted - 8388608.0f);
}

/* n float16 values -> float32 (exact). */
static void f16_to_float_n(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(EETQ_AVX512)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
#elif defined(EETQ_AVX2) && defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
    for (; i < n; i++) dst[i] = f16_to_float(src[i]);
}

/* Activation and result formats of eetq_stream. */
enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_F16 = 2 };

/* v rounded to the format (the identity for float32). */
static float round_to(int format, float v) {
    if (format == FORMAT_BF16) return bf16_to_float(bf16_scalar(v));
    if (format == FORMAT_F16) return f16_to_float(f16_scalar(v));
    return v;
}

/* sum_i x[i] * y[i], VW lanes at a time (the LoRA adapter's small dot products). */
INLINE float dot_f(const float* x, const float* y, int64_t n) {
    vf acc = (vf){0};
    int64_t i = 0;
    for (; i + VW <= n; i += VW) acc = fmadd(load_f(x + i), load_f(y + i), acc);
    float t = tree_sum(acc);
    for (; i < n; i++) t = fmadd1(x[i], y[i], t);
    return t;
}

/* hidden[j0 + j] = sum_k a[k] * lora_a[j0 + j, k] for JB rows of the adapter's A [rank, K] at once. */
INLINE void lora_hidden(int JB, const float* a, const float* lora_a, int64_t K, int64_t j0, float* hidden) {
    vf acc[4];
    for (int j = 0; j < JB; j++) acc[j] = (vf){0};
    int64_t k = 0;
    for (; k + VW <= K; k += VW) {
        vf x = load_f(a + k);
        for (int j = 0; j < JB; j++) acc[j] = fmadd(x, load_f(lora_a + (j0 + j) * K + k), acc[j]);
    }
    for (int j = 0; j < JB; j++) {
        float t = tree_sum(acc[j]);
        for (int64_t kk = k; kk < K; kk++) t = fmadd1(a[kk], lora_a[(j0 + j) * K + kk], t);
        hidden[j0 + j] = t;
    }
}

/* v rounded to the format, lane by lane (the identity for float32; float16 is never asked). */
INLINE vf round_v(int format, vf v) {
    if (format != FORMAT_BF16) return v;
    vu u;
    memcpy(&u, &v, sizeof u);
    vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u); /* all ones in NaN lanes: they become 0x7FC0 (bf16_scalar) */
    u = (((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u) & ~nan) | (0x7FC00000u & nan);
    memcpy(&v, &u, sizeof v);
    return v;
}

/* Lane i of the result is sum_j hidden[j] * lora_b[i * rank + j]: the adapter's B [N, rank] applied
   to VW output columns at once. */
INLINE vf lora_columns(const float* hidden, const float* lora_b, int64_t rank) {
    vf p[VW];
    float tail[VW];
    int64_t full = rank / VW * VW;
    for (int i = 0; i < VW; i++) {
        const float* b = lora_b + i * rank;
        vf acc = (vf){0};
        for (int64_t j = 0; j < full; j += VW) acc = fmadd(load_f(b + j), load_f(hidden + j), acc);
        p[i] = acc;
        float t = 0.f;
        for (int64_t j = full; j < rank; j++) t = fmadd1(b[j], hidden[j], t);
        tail[i] = t;
    }
    vf sums;
#if defined(EETQ_AVX2)
    /* Eight horizontal sums at once: hadd pairs lanes within each 128-bit half, then the halves add. */
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)p[0], (__m256)p[1]), _mm256_hadd_ps((__m256)p[2], (__m256)p[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)p[4], (__m256)p[5]), _mm256_hadd_ps((__m256)p[6], (__m256)p[7]));
    sums = (vf)_mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
#else
    for (int i = 0; i < VW; i++) sums[i] = tree_sum(p[i]);
#endif
    return sums + load_f(tail);
}

/* One call for a small-M matmul straight from the layer's tensors: activations a [M, K] in
   a_format (float32, bfloat16 or float16 bits), float16 scales, result in out_format (rounded to
   nearest even). rowaxpy (kernel == 1) or rowdot (0) over q [R, C]; the scale applies to q's rows
   (scale_on_rows) or columns. The conversions are exact, so the base result equals the float32
   kernels' on the converted operands, rounded once.
   With lora_a [rank, K] and lora_b [N, rank] (float32), it also adds a LoRA adapter the way PEFT's
   layer does in the result dtype: out = r(r(base) + r(r(a @ A^T @ B^T) * scaling)), r rounding to
   the result dtype (the identity for float32). Returns 0, -1 if out of memory. */
static int eetq_stream(int kernel, const void* a, int a_format, int64_t M, int64_t lda, const int8_t* q, int64_t R,
                int64_t C, int64_t ldq, const uint16_t* scale_f16, int scale_on_rows, void* out, int out_format,
                int64_t ldo, const float* lora_a, int64_t rank, const float* lora_b, float scaling, int nthreads) {
    int64_t K = kernel ? R : C, N = kernel ? C : R, S = scale_on_rows ? R : C;
    float* a32 = NULL;
    float* hidden = NULL;
    int narrow_out = out_format != FORMAT_F32;
    float* out32 = narrow_out ? (float*)malloc(sizeof(float) * (size_t)(M * N > 0 ? M * N : 1)) : (float*)out;
    float* scale = (float*)malloc(sizeof(float) * (size_t)(S > 0 ? S : 1));
    int status = -1;
    if ((narrow_out && !out32) || !scale) goto done;
    f16_to_float_n(scale_f16, scale, S);
    if (a_format != FORMAT_F32) {
        a32 = (float*)malloc(sizeof(float) * (size_t)(M * K > 0 ? M * K : 1));
        if (!a32) goto done;
        for (int64_t m = 0; m < M; m++) {
            const uint16_t* row = (const uint16_t*)a + m * lda;
            if (a_format == FORMAT_F16)
                f16_to_float_n(row, a32 + m * K, K);
            else
                for (int64_t k = 0; k < K; k++) a32[m * K + k] = bf16_to_float(row[k]);
        }
    }
    const float* av = a32 ? a32 : (const float*)a;
    int64_t la = a32 ? K : lda, lo = narrow_out ? N : ldo;
    const float* rs = scale_on_rows ? scale : NULL;
    const float* cs = scale_on_rows ? NULL : scale;
    status = kernel ? eetq_rowaxpy(av, M, la, q, R, C, ldq, rs, cs, out32, lo, nthreads)
                    : eetq_rowdot(av, M, la, q, R, C, ldq, rs, cs, out32, lo, nthreads);
    if (status != 0) goto done;
    if (lora_a) {
        hidden = (float*)malloc(sizeof(float) * (size_t)(M * rank > 0 ? M * rank : 1));
        if (!hidden) {
            status = -1;
            goto done;
        }
        for (int64_t m = 0; m < M; m++) {
            int64_t j = 0;
            for (; j + 4 <= rank; j += 4) lora_hidden(4, av + m * la, lora_a, K, j, hidden + m * rank);
            for (; j < rank; j++) lora_hidden(1, av + m * la, lora_a, K, j, hidden + m * rank);
        }
    }
    for (int64_t m = 0; m < M; m++) {
        float* row = out32 + m * lo;
        int64_t n = 0;
        if (hidden) {
            /* The adapter's output for VW columns at a time, then PEFT's roundings, vectorized where
               the result is float32 or bfloat16. */
            for (; out_format != FORMAT_F16 && n + VW <= N; n += VW) {
                vf t = lora_columns(hidden + m * rank, lora_b + n * rank, rank);
                vf v = round_v(out_format, round_v(out_format, load_f(row + n)) +
                                               round_v(out_format, round_v(out_format, t) * splat(scaling)));
                if (out_format == FORMAT_BF16)
                    store_bf16((uint16_t*)out + m * ldo + n, v);
                else
                    store_f(row + n, v);
            }
        }
        for (; n < N; n++) {
            float v = row[n];
            if (hidden) {
                float t = dot_f(hidden + m * rank, lora_b + n * rank, rank);
                v = round_to(out_format, round_to(out_format, v) +
                                             round_to(out_format, round_to(out_format, t) * scaling));
            }
            if (out_format == FORMAT_BF16)
                ((uint16_t*)out)[m * ldo + n] = bf16_scalar(v);
            else if (out_format == FORMAT_F16)
                ((uint16_t*)out)[m * ldo + n] = f16_scalar(v);
            else
                row[n] = v;
        }
    }
done:
    free(a32);
    free(hidden);
    free(scale);
    if (narrow_out) free(out32);
    return status;
}

/* The operands of an eetq_stream call that stay the same across a layer's calls: everything but the
   activation, the result and the thread count. The Python caller fills one per layer (and one per
   adapter) and passes its address, so each call converts 7 arguments instead of 19. lora_a is NULL
   for no adapter. Mirrored by native.StreamOperands. */
typedef struct {
    const int8_t* q;
    const uint16_t* scales;
    const float* lora_a;
    const float* lora_b;
    int64_t rows, columns, ldq, lda, ldo, rank;
    int32_t kernel, scale_on_rows;
    float scaling;
} eetq_stream_operands;

int eetq_stream_call(const eetq_stream_operands* s, const void* a, int a_format, int64_t M, void* out, int out_format,
                     int nthreads) {
    return eetq_stream(s->kernel, a, a_format, M, s->lda, s->q, s->rows, s->columns, s->ldq, s->scales,
                       s->scale_on_rows, out, out_format, s->ldo, s->lora_a, s->rank, s->lora_b, s->scaling, nthreads);
}

#ifdef EETQ_BF16_DOT
/* bfloat16 variants for several activation rows in bfloat16 (cpu.py takes them from
   BF16_DOT_MIN_ROWS rows): VDPBF16PS does two multiply-adds per lane, and int8 converts to
   bfloat16 exactly, so only the activations' rounding differs from the float32 kernels. Weights
   are converted once per 8 activation rows. */

INLINE void rowdot16_block(int MB, const uint16_t* a, int64_t lda, const int8_t* q, int64_t ldq, int64_t C,
                           const float* row_scale, float* out, int64_t ldo, int64_t r0, int64_t m0) {
    __m512 acc[2][8];
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < MB; i++) acc[r][i] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
        __m512bh w[2];
        for (int r = 0; r < 2; r++) {
            __m256i bytes = _mm256_loadu_si256((const __m256i*)(q + (r0 + r) * ldq + c));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
            w[r] = _mm512_cvtne2ps_pbh(hi, lo);
        }
        if (m0 == 0 && (c & 63) == 0)
            for (int r = 0; r < 2; r++) __builtin_prefetch(q + (r0 + r) * ldq + c + ROW_PREFETCH, 0, 2);
        for (int i = 0; i < MB; i++) {
            __m512bh x = (__m512bh)_mm512_loadu_si512((const void*)(a + (m0 + i) * lda + c));
            for (int r = 0; r < 2; r++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], x, w[r]);
        }
    }
    for (int r = 0; r < 2; r++)
        for (int i = 0; i < MB; i++) {
            float t = _mm512_reduce_add_ps(acc[r][i]);
            for (int64_t cc = c; cc < C; cc++)
                t += bf16_to_float(a[(m0 + i) * lda + cc]) * (float)q[(r0 + r) * ldq + cc];
            out[(m0 + i) * ldo + r0 + r] = row_scale ? t * row_scale[r0 + r] : t;
        }
}

/* out[m, r] = row_scale[r] * sum_c a[m, c] * q[r, c] with bfloat16 activations a (raw bits). */
void eetq_rowdot_bf16(const uint16_t* a, int64_t M, int64_t lda, const int8_t* q, int64_t R, int64_t C, int64_t ldq,
                      const float* row_scale, float* out, int64_t ldo, int nthreads) {
    int64_t blocks = R / 2;
    (void)nthreads; /* read only by the OpenMP directive */
    OMP(omp parallel for schedule(static) num_threads(thread_count(nthreads)))
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r0 = 2 * b;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            switch ((int)MIN(8, M - m0)) {
            case 8: rowdot16_block(8, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            case 7: rowdot16_block(7, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            case 6: rowdot16_block(6, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            case 5: rowdot16_block(5, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            case 4: rowdot16_block(4, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            case 3: rowdot16_block(3, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            case 2: rowdot16_block(2, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            default: rowdot16_block(1, a, lda, q, ldq, C, row_scale, out, ldo, r0, m0); break;
            }
        }
    }
    if (R % 2)
        for (int64_t m = 0; m < M; m++) {
            float t = 0.f;
            for (int64_t c = 0; c < C; c++) t += bf16_to_float(a[m * lda + c]) * (float)q[(R - 1) * ldq + c];
            out[m * ldo + R - 1] = row_scale ? t * row_scale[R - 1] : t;
        }
}

/* acc[i, c0 + j] (+)= sum over row pairs p of gp[i, p] . (q[2p, c0 + j], q[2p + 1, c0 + j]). */
INLINE void axpy16_tile(int MB, const uint32_t* gp, int64_t ldgp, const int8_t* q, int64_t ldq, int64_t p0, int64_t p1,
                        int64_t c0, float* acc, int64_t ldacc, int first) {
    __m512 s[8][2];
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < 2; v++)
            s[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + i * ldacc + c0 + 16 * v);
    for (int64_t p = p0; p < p1; p++) {
        const int8_t* row = q + 2 * p * ldq + c0;
        __m512bh w[2];
        for (int v = 0; v < 2; v++) {
            __m128i x0 = _mm_loadu_si128((const __m128i*)(row + 16 * v));
            __m128i x1 = _mm_loadu_si128((const __m128i*)(row + ldq + 16 * v));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpacklo_epi8(x0, x1)));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_unpackhi_epi8(x0, x1)));
            w[v] = _mm512_cvtne2ps_pbh(hi, lo);
        }
        for (int i = 0; i < MB; i++) {
            __m512bh g = (__m512bh)_mm512_set1_epi32((int)gp[i * ldgp + p]);
            for (int v = 0; v < 2; v++) s[i][v] = _mm512_dpbf16_ps(s[i][v], g, w[v]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < 2; v++) _mm512_storeu_ps(acc + i * ldacc + c0 + 16 * v, s[i][v]);
}

/* out[m, c] = col_scale[c] * sum_r a[m, r] * q[r, c] with bfloat16 activations a (raw bits). */
int eetq_rowaxpy_bf16(const uint16_t* a, int64_t M, int64_t lda, const int8_t* q, int64_t R, int64_t C, int64_t ldq,
                      const float* col_scale, float* out, int64_t ldo, int nthreads) {
    int T = thread_count(nthreads);
    int64_t pairs = R / 2;
    size_t partial_size = (size_t)T * M * C, gp_size = (size_t)M * (pairs > 0 ? pairs : 1);
    float* partial = (float*)malloc(sizeof(float) * (partial_size > 0 ? partial_size : 1));
    uint32_t* gp = (uint32_t*)malloc(sizeof(uint32_t) * gp_size);
    if (!partial || !gp) {
        free(partial);
        free(gp);
        return -1;
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t p = 0; p < pairs; p++)
            gp[m * pairs + p] = (uint32_t)a[m * lda + 2 * p] | ((uint32_t)a[m * lda + 2 * p + 1] << 16);
    int64_t panel = PANEL_BYTES / (2 * (C > 0 ? C : 1));
    if (panel < 2) panel = 2;
    OMP(omp parallel num_threads(T))
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int t = 0, nt = 1;
#endif
        float* acc = partial + (int64_t)t * M * C;
        int64_t pa = pairs * t / nt, pb = pairs * (t + 1) / nt;
        memset(acc, 0, sizeof(float) * M * C);
        int64_t full_end = C / 32 * 32;
        for (int64_t p0 = pa; p0 < pb; p0 += panel) {
            int64_t p1 = MIN(pb, p0 + panel);
            /* Spread prefetches of the next panel over this panel's column tiles. */
            const int8_t* pf = q + 2 * p1 * ldq;
            const int8_t* pf_end = q + 2 * MIN(pb, p1 + panel) * ldq;
            int64_t per_tile = full_end > 0 ? ((pf_end - pf) / (full_end / 32) + 63) / 64 : 0;
            for (int64_t c0 = 0; c0 < full_end; c0 += 32) {
                for (int64_t l = 0; l < per_tile && pf < pf_end; l++, pf += 64) __builtin_prefetch(pf, 0, 2);
                for (int64_t m0 = 0; m0 < M; m0 += 8) {
                    const uint32_t* g = gp + m0 * pairs;
                    float* am = acc + m0 * C;
                    switch ((int)MIN(8, M - m0)) {
                    case 8: axpy16_tile(8, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    case 7: axpy16_tile(7, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    case 6: axpy16_tile(6, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    case 5: axpy16_tile(5, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    case 4: axpy16_tile(4, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    case 3: axpy16_tile(3, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    case 2: axpy16_tile(2, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    default: axpy16_tile(1, g, pairs, q, ldq, p0, p1, c0, am, C, 0); break;
                    }
                }
            }
            for (int64_t c = full_end; c < C; c++)
                for (int64_t m = 0; m < M; m++) {
                    float v = 0.f;
                    for (int64_t p = p0; p < p1; p++)
                        v += bf16_to_float(a[m * lda + 2 * p]) * (float)q[2 * p * ldq + c] +
                             bf16_to_float(a[m * lda + 2 * p + 1]) * (float)q[(2 * p + 1) * ldq + c];
                    acc[m * C + c] += v;
                }
        }
        if (t == nt - 1 && R % 2)
            for (int64_t m = 0; m < M; m++) {
                float x = bf16_to_float(a[m * lda + R - 1]);
                for (int64_t c = 0; c < C; c++) acc[m * C + c] += x * (float)q[(R - 1) * ldq + c];
            }
        OMP(omp barrier)
        reduce_partials(partial, nt, t, M, C, col_scale, out, ldo);
    }
    free(partial);
    free(gp);
    return 0;
}
#endif
