/* Float16 rows x float32 weights -> float32 scores, for the rare-cell sweep (query/hunt/fp16dot.py).
 *
 * out[i] = sum_j float(x[i, j]) * w[j], accumulated in float32. On x86-64 CPUs with AVX2, FMA and F16C the rows
 * are converted 8 values at a time with vcvtph2ps (no float32 copy of the block is ever written), which keeps
 * one core near memory bandwidth; elsewhere a portable scalar loop gives the same sums up to float32 rounding
 * order. Called through ctypes, which releases the GIL, so Python threads can score disjoint row ranges.
 *
 * The file is also a (trivial) CPython extension module so that setuptools builds it with the package.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SCATLAS_X86 1
#endif

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void matvec_scalar(const uint16_t *x, const float *w, float *out, int64_t n, int64_t d) {
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = x + i * d;
        float acc = 0.0f;
        for (int64_t j = 0; j < d; j++) acc += half_to_float(row[j]) * w[j];
        out[i] = acc;
    }
}

#ifdef SCATLAS_X86
__attribute__((target("avx2,fma,f16c"))) static float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma,f16c"))) static float dot_row_avx2(const uint16_t *r, const float *w, int64_t d) {
    /* one row, read front to back (a single sequential stream: interleaving two rows halved the rate at
       d >= 256), four independent accumulators to hide the FMA latency */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + j))), _mm256_loadu_ps(w + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + j + 8))), _mm256_loadu_ps(w + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + j + 16))), _mm256_loadu_ps(w + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + j + 24))), _mm256_loadu_ps(w + j + 24), a3);
    }
    for (; j + 8 <= d; j += 8)
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + j))), _mm256_loadu_ps(w + j), a0);
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < d; j++) s += _cvtsh_ss(r[j]) * w[j];
    return s;
}

__attribute__((target("avx2,fma,f16c"))) static void matvec_avx2(const uint16_t *x, const float *w, float *out,
                                                                    int64_t n, int64_t d) {
    const int64_t d16 = d & ~(int64_t)15, d8 = d & ~(int64_t)7;
    int64_t i = 0;
    if (d >= 256) {
        for (; i < n; i++) out[i] = dot_row_avx2(x + i * d, w, d);
        return;
    }
    for (; i + 2 <= n; i += 2) { /* short rows: two adjacent rows share each weight load (one stream) */
        const uint16_t *r0 = x + i * d, *r1 = r0 + d;
        __m256 a0 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j < d16; j += 16) {
            __m256 w0 = _mm256_loadu_ps(w + j), w1 = _mm256_loadu_ps(w + j + 8);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r0 + j))), w0, a0);
            b0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r0 + j + 8))), w1, b0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r1 + j))), w0, a1);
            b1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r1 + j + 8))), w1, b1);
        }
        for (; j < d8; j += 8) {
            __m256 w0 = _mm256_loadu_ps(w + j);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r0 + j))), w0, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r1 + j))), w0, a1);
        }
        float s0 = hsum256(_mm256_add_ps(a0, b0)), s1 = hsum256(_mm256_add_ps(a1, b1));
        for (; j < d; j++) {
            s0 += _cvtsh_ss(r0[j]) * w[j];
            s1 += _cvtsh_ss(r1[j]) * w[j];
        }
        out[i] = s0;
        out[i + 1] = s1;
    }
    for (; i < n; i++) out[i] = dot_row_avx2(x + i * d, w, d);
}
#endif

/* 1 when the vectorised path runs on this CPU, 0 for the portable loop. */
int scatlas_fp16_simd(void) {
#ifdef SCATLAS_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* out[i] = x[i, :] . w for i < n; x is row-major float16 (n, d), w float32 (d,). simd < 0: choose. */
void scatlas_fp16_matvec(const uint16_t *x, const float *w, float *out, int64_t n, int64_t d, int simd) {
#ifdef SCATLAS_X86
    if (simd < 0) simd = scatlas_fp16_simd();
    if (simd) {
        matvec_avx2(x, w, out, n, d);
        return;
    }
#endif
    (void)simd;
    matvec_scalar(x, w, out, n, d);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fp16dot",
                                    "float16 matrix-vector kernel (used through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__fp16dot(void) { return PyModule_Create(&module); }
