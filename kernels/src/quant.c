/* Quantized-weight matmul: y[M,N] = x[M,K] @ W[N,K]^T with W kept in its GGUF block format.
 *
 * Numerics follow llama.cpp's CPU backend, so the native engine and llama.cpp compute the same
 * thing from the same file: each row of x is quantized once per call to Q8_0 (blocks of 32, fp16
 * scale) for Q4_0/Q5_0/Q8_0 weights or to Q8_K (blocks of 256, fp32 scale, 16-value sums) for
 * Q4_K/Q5_K/Q6_K weights; every block dot product is an exact int32 sum, scaled in float.
 * Reading 4-8 bit weights instead of fp32 is also what makes decode fast (it is bandwidth bound).
 *
 * A weight row is unpacked once per call into int8 values plus per-sub-block integer scales and
 * mins (scratch), then dotted against every x row: prefill (M = chunk) reuses it M times. Q8_0
 * rows need no unpacking and are read in place. Threads split N. */
#include "capibara6_kernels.h"
#include <math.h>
#include <stdlib.h>

enum { T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef struct {
    int qk;          /* values per block */
    int bytes;       /* bytes per block */
    int sub;         /* values per sub-block sharing one integer scale (== qk: one scale) */
    int kquant;      /* activations as Q8_K (1) or Q8_0 (0) */
} qinfo;

static int info(int t, qinfo *q) {
    switch (t) {
    case T_Q4_0: *q = (qinfo){32, 18, 32, 0}; return 1;
    case T_Q5_0: *q = (qinfo){32, 22, 32, 0}; return 1;
    case T_Q8_0: *q = (qinfo){32, 34, 32, 0}; return 1;
    case T_Q4_K: *q = (qinfo){256, 144, 32, 1}; return 1;
    case T_Q5_K: *q = (qinfo){256, 176, 32, 1}; return 1;
    case T_Q6_K: *q = (qinfo){256, 210, 16, 1}; return 1;
    default: return 0;
    }
}

int c6_qtype_block(int wtype, int *values, int *bytes) {
    qinfo q;
    if (!info(wtype, &q)) return 0;
    *values = q.qk;
    *bytes = q.bytes;
    return 1;
}

/* ---------------------------------------------------------------- fp16 <-> fp32 (bit exact) */
float c6_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        float f = (float)m * 5.9604644775390625e-8f; /* 2^-24: subnormal or zero */
        return sign ? -f : f;
    }
    if (e == 31) return c6_u2f(sign | 0x7f800000u | (m << 13));
    return c6_u2f(sign | ((e + 112) << 23) | (m << 13));
}

/* round to nearest even; overflow -> inf, NaN -> quiet NaN */
uint16_t c6_f32_to_f16(float f) {
    uint32_t u = c6_f2u(f), sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {                                  /* below 2^-14: subnormal half */
        float s = c6_u2f(a) * 16777216.0f;                  /* exact: scale by 2^24 */
        return (uint16_t)(sign | (uint32_t)rintf(s));       /* rintf: ties to even */
    }
    uint32_t mant = a & 0x7fffff, exp = (a >> 23) - 112;
    uint32_t h = (exp << 10) | (mant >> 13), rest = mant & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;  /* carry into exp is correct */
    return (uint16_t)(sign | h);
}

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* block scales: the hardware conversion where there is one (same value as c6_f16_to_f32) */
#if defined(__F16C__)
#include <immintrin.h>
static inline float f16s(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }
#elif defined(__aarch64__)
static inline float f16s(const uint8_t *p) { __fp16 h; memcpy(&h, p, 2); return (float)h; }
#else
static inline float f16s(const uint8_t *p) { return c6_f16_to_f32(rd16(p)); }
#endif

/* ---------------------------------------------------------------- activation quantization */
typedef struct {
    int8_t *q;       /* [M, K] */
    float *d;        /* [M, K/32] (Q8_0) or [M, K/256] (Q8_K) */
    int32_t *bsum;   /* Q8_K only: [M, K/16] sums of 16 consecutive q */
} qact;

/* Q8_0 as llama.cpp's x86 path: d = amax/127 stored as fp16, q = rne(x * 127/amax) */
static void quant_q8_0(const float *restrict x, int8_t *restrict q, float *restrict d, int64_t K) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        d[b] = c6_f16_to_f32(c6_f32_to_f16(amax / 127.0f));
        for (int j = 0; j < 32; j++) q[b * 32 + j] = (int8_t)rintf(xb[j] * id);
    }
}

/* Q8_K as quantize_row_q8_K_ref: the first value of largest magnitude maps to -127 */
static void quant_q8_K(const float *restrict x, int8_t *restrict q, float *restrict d,
                       int32_t *restrict bsum, int64_t K) {
    for (int64_t b = 0; b < K / 256; b++) {
        const float *xb = x + b * 256;
        int8_t *qb = q + b * 256;
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < 256; j++) {
            float ax = fabsf(xb[j]);
            if (ax > amax) { amax = ax; mx = xb[j]; }
        }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            memset(qb, 0, 256);
        } else {
            float iscale = -127.0f / mx;
            for (int j = 0; j < 256; j++) {
                float v = rintf(iscale * xb[j]);
                qb[j] = (int8_t)(v > 127.0f ? 127.0f : v);
            }
            d[b] = 1.0f / iscale;
        }
        for (int s = 0; s < 16; s++) {
            int32_t acc = 0;
            for (int j = 0; j < 16; j++) acc += qb[s * 16 + j];
            bsum[b * 16 + s] = acc;
        }
    }
}

/* ---------------------------------------------------------------- weight row unpacking */
typedef struct {
    int8_t *q;       /* [K] values (k-quants with mins: unsigned 0..31; others signed) */
    float *d;        /* [K/qk] block scale */
    float *dmin;     /* [K/qk] block min scale (Q4_K/Q5_K) */
    int16_t *sc;     /* [K/16] scale of each 16 values (k-quants) */
    int32_t *mn;     /* [K/32] sub-block min (Q4_K/Q5_K) */
} qrow;

/* bit j of a byte -> byte j of 8 bytes: 0x00 if set, 0xF0 if clear (Q5_0's fifth bit, minus 16) */
static uint64_t high5_lut[256];
__attribute__((constructor)) static void high5_init(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t x = 0;
        for (int j = 0; j < 8; j++) if (!(v >> j & 1)) x |= (uint64_t)0xF0 << (8 * j);
        high5_lut[v] = x;
    }
}

/* Q4_K/Q5_K: 8 sub-block scales and mins, 6 bits each, packed in 12 bytes */
static inline void kscale(const uint8_t *s, int j, int32_t *sc, int32_t *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st64(int8_t *p, uint64_t v) { memcpy(p, &v, 8); }
#define LO4 0x0F0F0F0F0F0F0F0FULL

/* 8 bytes at a time (SWAR): n - 8 for a nibble n is n ^ 8 read as two's complement of n - 8... only
 * in 4 bits, so flip bit 3 and sign-extend by OR-ing 0xF0 where the flipped bit 3 is set */
static inline uint64_t nib_minus8(uint64_t n) {
    uint64_t f = n ^ 0x0808080808080808ULL;               /* n - 8 in 4-bit two's complement */
    uint64_t neg = (f >> 3) & 0x0101010101010101ULL;     /* bit 3 set: negative */
    return f | (neg * 0xF0);
}

static void unpack_q4_0(const uint8_t *restrict p, int8_t *restrict q, float *d) {
    *d = f16s(p);
    for (int h = 0; h < 2; h++) {
        uint64_t v = ld64(p + 2 + 8 * h);
        st64(q + 8 * h, nib_minus8(v & LO4));
        st64(q + 16 + 8 * h, nib_minus8((v >> 4) & LO4));
    }
}

/* Q5_0: value = (nibble | bit5 << 4) - 16 = nibble | (bit5 ? 0x00 : 0xF0) as a byte: no borrows */
static void unpack_q5_0(const uint8_t *restrict p, int8_t *restrict q, float *d) {
    *d = f16s(p);
    for (int h = 0; h < 2; h++) {
        uint64_t v = ld64(p + 6 + 8 * h);
        st64(q + 8 * h, (v & LO4) | high5_lut[p[2 + h]]);
        st64(q + 16 + 8 * h, ((v >> 4) & LO4) | high5_lut[p[4 + h]]);
    }
}

static void unpack_q45_k(const uint8_t *restrict p, int five, int8_t *restrict q, float *d, float *dmin,
                         int16_t *sc16, int32_t *mn) {
    const uint8_t *sc = p + 4, *qh = p + 16, *qs = p + (five ? 48 : 16);
    *d = f16s(p);
    *dmin = f16s(p + 2);
    for (int j = 0; j < 8; j++) {
        int32_t s;
        kscale(sc, j, &s, &mn[j]);
        sc16[2 * j] = sc16[2 * j + 1] = (int16_t)s;
    }
    for (int c = 0; c < 4; c++) {          /* 64 values: low nibbles, then high nibbles */
        const uint8_t *s = qs + c * 32;
        int8_t *o = q + c * 64;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(s[l] & 0xF);
            o[l + 32] = (int8_t)(s[l] >> 4);
        }
        if (five)
            for (int l = 0; l < 32; l++) {
                o[l] |= (int8_t)(((qh[l] >> (2 * c)) & 1) << 4);
                o[l + 32] |= (int8_t)(((qh[l] >> (2 * c + 1)) & 1) << 4);
            }
    }
}

static void unpack_q6_k(const uint8_t *restrict p, int8_t *restrict q, float *d, int16_t *sc16) {
    const uint8_t *ql = p, *qh = p + 128;
    const int8_t *sc = (const int8_t *)(p + 192);
    *d = f16s(p + 208);
    for (int j = 0; j < 16; j++) sc16[j] = sc[j];
    for (int n = 0; n < 2; n++) {          /* 128 values per half */
        const uint8_t *l0 = ql + n * 64, *h0 = qh + n * 32;
        int8_t *o = q + n * 128;
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((l0[l] & 0xF) | ((h0[l] & 3) << 4)) - 32);
            o[l + 32] = (int8_t)(((l0[l + 32] & 0xF) | (((h0[l] >> 2) & 3) << 4)) - 32);
            o[l + 64] = (int8_t)(((l0[l] >> 4) | (((h0[l] >> 4) & 3) << 4)) - 32);
            o[l + 96] = (int8_t)(((l0[l + 32] >> 4) | (((h0[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

static void unpack_row(int t, const uint8_t *restrict w, int64_t nb, qrow *r) {
    for (int64_t b = 0; b < nb; b++) {
        switch (t) {
        case T_Q4_0: unpack_q4_0(w + b * 18, r->q + b * 32, &r->d[b]); break;
        case T_Q5_0: unpack_q5_0(w + b * 22, r->q + b * 32, &r->d[b]); break;
        case T_Q4_K:
        case T_Q5_K:
            unpack_q45_k(w + b * (t == T_Q5_K ? 176 : 144), t == T_Q5_K, r->q + b * 256, &r->d[b],
                         &r->dmin[b], r->sc + b * 16, r->mn + b * 8);
            break;
        case T_Q6_K: unpack_q6_k(w + b * 210, r->q + b * 256, &r->d[b], r->sc + b * 16); break;
        }
    }
}

/* ---------------------------------------------------------------- int8 dot products
 * dot32(w, a, stride-free): 32 int8 products; the block's float scale is applied per block
 * (Q8_0 family) or the int16 scale per 16 values inside the 256-block (k-quants). */
#if C6_USE_NEON && defined(__ARM_FEATURE_DOTPROD)
static inline int32x4_t dot16(int32x4_t acc, const int8_t *a, const int8_t *b) {
    return vdotq_s32(acc, vld1q_s8(a), vld1q_s8(b));
}
#elif C6_USE_NEON
static inline int32x4_t dot16(int32x4_t acc, const int8_t *a, const int8_t *b) {
    int8x16_t va = vld1q_s8(a), vb = vld1q_s8(b);
    int16x8_t p = vmull_s8(vget_low_s8(va), vget_low_s8(vb));
    p = vmlal_s8(p, vget_high_s8(va), vget_high_s8(vb));
    return vpadalq_s16(acc, p);
}
#endif
#if defined(__AVX2__) && !C6_USE_NEON
#include <immintrin.h>
/* 16 int16 lanes: lane i = w[2i]a[2i] + w[2i+1]a[2i+1] (|.| <= 2*127*127: no saturation) */
static inline __m256i mul_pairs(const int8_t *w, const int8_t *a) {
    __m256i wv = _mm256_loadu_si256((const __m256i *)w), av = _mm256_loadu_si256((const __m256i *)a);
    return _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv));
}
static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#if defined(__FMA__)
#define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define FMADD(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
#endif

/* Q8_0-family row: blocks of 32 int8 at w (stride ws bytes), scales wd (or fp16 in raw Q8_0) */
static float dot_q0(const int8_t *w, int64_t wstride, const float *wd, const uint8_t *raw_d,
                    const int8_t *a, const float *ad, int64_t nb) {
#if defined(__AVX2__) && !C6_USE_NEON
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        float d = raw_d ? f16s(raw_d + b * wstride) : wd[b];
        __m256i s = _mm256_madd_epi16(mul_pairs(w + b * wstride, a + b * 32), ones);
        acc = FMADD(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * ad[b]), acc);
    }
    return hsum_ps(acc);
#elif C6_USE_NEON
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        float d = raw_d ? f16s(raw_d + b * wstride) : wd[b];
        const int8_t *wb = w + b * wstride, *xb = a + b * 32;
        int32x4_t s = dot16(dot16(vdupq_n_s32(0), wb, xb), wb + 16, xb + 16);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(s), d * ad[b]);
    }
    return vaddvq_f32(acc);
#else
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        float d = raw_d ? f16s(raw_d + b * wstride) : wd[b];
        const int8_t *wb = w + b * wstride, *xb = a + b * 32;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += (int32_t)wb[j] * (int32_t)xb[j];
        sum += (float)s * (d * ad[b]);
    }
    return sum;
#endif
}

/* k-quant row: 256-blocks, int16 scale per 16 values, float scale per block */
static float dot_qk(const int8_t *w, const int16_t *sc, const float *wd, const int8_t *a,
                    const float *ad, int64_t nb) {
#if defined(__AVX2__) && !C6_USE_NEON
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i ai = _mm256_setzero_si256();
        const int16_t *s = sc + b * 16;
        for (int c = 0; c < 8; c++) {
            __m256i sv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(s[2 * c])),
                                                 _mm_set1_epi16(s[2 * c + 1]), 1);
            ai = _mm256_add_epi32(ai, _mm256_madd_epi16(mul_pairs(w + b * 256 + c * 32, a + b * 256 + c * 32), sv));
        }
        acc = FMADD(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(wd[b] * ad[b]), acc);
    }
    return hsum_ps(acc);
#elif C6_USE_NEON
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32x4_t ai = vdupq_n_s32(0);
        const int8_t *wb = w + b * 256, *xb = a + b * 256;
        for (int s = 0; s < 16; s++)
            ai = vmlaq_n_s32(ai, dot16(vdupq_n_s32(0), wb + 16 * s, xb + 16 * s), sc[b * 16 + s]);
        sum += wd[b] * ad[b] * (float)vaddvq_s32(ai);
    }
    return sum;
#else
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        const int8_t *wb = w + b * 256, *xb = a + b * 256;
        for (int s = 0; s < 16; s++) {
            int32_t p = 0;
            for (int j = 0; j < 16; j++) p += (int32_t)wb[16 * s + j] * (int32_t)xb[16 * s + j];
            isum += sc[b * 16 + s] * p;
        }
        sum += wd[b] * ad[b] * (float)isum;
    }
    return sum;
#endif
}

/* Q4_K/Q5_K: sum over blocks of dmin * d_act * (sub-block mins . activation sub-block sums) */
static float kmins(const qrow *w, const qact *a, int64_t m, int64_t K) {
    int64_t nb = K / 256;
    const int32_t *bs = a->bsum + m * (K / 16);
    const float *ad = a->d + m * nb;
    float msum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int32_t *mn = w->mn + b * 8, *bb = bs + b * 16;
        int32_t mi = 0;
        for (int s = 0; s < 8; s++) mi += mn[s] * (bb[2 * s] + bb[2 * s + 1]);
        msum += w->dmin[b] * ad[b] * (float)mi;
    }
    return msum;
}

/* one weight row (unpacked, or raw Q8_0 blocks) against activation row m */
static float row_dot(int t, const qinfo *qi, const uint8_t *raw, const qrow *w, const qact *a,
                     int64_t m, int64_t K) {
    int64_t nb = K / qi->qk;
    const int8_t *aq = a->q + m * K;
    const float *ad = a->d + m * nb;
    if (t == T_Q8_0) return dot_q0((const int8_t *)(raw + 2), 34, NULL, raw, aq, ad, nb);
    if (!qi->kquant) return dot_q0(w->q, 32, w->d, NULL, aq, ad, nb);
    float sum = dot_qk(w->q, w->sc, w->d, aq, ad, nb);
    return t == T_Q6_K ? sum : sum - kmins(w, a, m, K);
}

#if defined(__AVX2__) && !C6_USE_NEON
/* x86: up to 4 activation rows per pass over a weight row, Q4_0/Q5_0/Q8_0 blocks decoded in
 * registers (no unpack buffer). Same integer sums as above; float sums in another order. */
#define C6_X86_ROWS 1
static inline __m256i dot32_i32(__m256i wabs, __m256i w, const int8_t *a) {
    __m256i av = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)a), w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, av);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, av), _mm256_set1_epi16(1));
#endif
}
/* 16 bytes -> 32 nibbles: low nibbles are values 0-15, high nibbles values 16-31 */
static inline __m256i nibbles32(const uint8_t *qs) {
    __m128i t = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}
/* byte j = 0xFF where bit j of the little-endian 32-bit word at p is set */
static inline __m256i bits32(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}
static inline __m256i block32(int t, const uint8_t *p) {
    if (t == T_Q8_0) return _mm256_loadu_si256((const __m256i *)(p + 2));
    if (t == T_Q4_0) return _mm256_sub_epi8(nibbles32(p + 2), _mm256_set1_epi8(8));
    return _mm256_or_si256(nibbles32(p + 6), _mm256_andnot_si256(bits32(p + 2), _mm256_set1_epi8((char)0xF0)));
}
static inline __attribute__((always_inline)) void q0_rows(int t, int bs, const uint8_t *raw, int64_t nb,
                                                          const qact *a, int64_t K, int64_t m0, const int MC,
                                                          float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = raw + b * bs;
        __m256i w = block32(t, p), wa = _mm256_sign_epi8(w, w);
        float dw = f16s(p);
        for (int i = 0; i < MC; i++) {
            int64_t m = m0 + i;
            __m256i s = dot32_i32(wa, w, a->q + m * K + b * 32);
            acc[i] = FMADD(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * a->d[m * nb + b]), acc[i]);
        }
    }
    for (int i = 0; i < MC; i++) out[i] = hsum_ps(acc[i]);
}
static inline __attribute__((always_inline)) void qk_rows(const qrow *w, const qact *a, int64_t K, int64_t m0,
                                                          const int MC, float *out) {
    int64_t nb = K / 256;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < nb; b++) {
        __m256i ai[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        const int16_t *s = w->sc + b * 16;
        for (int c = 0; c < 8; c++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w->q + b * 256 + c * 32)), wa = _mm256_sign_epi8(wv, wv);
            __m256i sv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(s[2 * c])),
                                                 _mm_set1_epi16(s[2 * c + 1]), 1);
            for (int i = 0; i < MC; i++) {
                const int8_t *ap = a->q + (m0 + i) * K + b * 256 + c * 32;
                __m256i av = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)ap), wv);
                ai[i] = _mm256_add_epi32(ai[i], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, av), sv));
            }
        }
        for (int i = 0; i < MC; i++)
            acc[i] = FMADD(_mm256_cvtepi32_ps(ai[i]), _mm256_set1_ps(w->d[b] * a->d[(m0 + i) * nb + b]), acc[i]);
    }
    for (int i = 0; i < MC; i++) out[i] = hsum_ps(acc[i]);
}
/* y[m, n] for every m of weight row n */
static void row_all_m_x86(int t, const qinfo *qi, const uint8_t *raw, const qrow *w, const qact *a,
                          int64_t M, int64_t N, int64_t K, int64_t n, float *y) {
    float o[4];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int mc = M - m0 < 4 ? (int)(M - m0) : 4;
        if (!qi->kquant) {
            int64_t nb = K / 32;
            switch (mc) {
            case 1: q0_rows(t, qi->bytes, raw, nb, a, K, m0, 1, o); break;
            case 2: q0_rows(t, qi->bytes, raw, nb, a, K, m0, 2, o); break;
            case 3: q0_rows(t, qi->bytes, raw, nb, a, K, m0, 3, o); break;
            default: q0_rows(t, qi->bytes, raw, nb, a, K, m0, 4, o); break;
            }
        } else {
            switch (mc) {
            case 1: qk_rows(w, a, K, m0, 1, o); break;
            case 2: qk_rows(w, a, K, m0, 2, o); break;
            case 3: qk_rows(w, a, K, m0, 3, o); break;
            default: qk_rows(w, a, K, m0, 4, o); break;
            }
            if (t != T_Q6_K)
                for (int i = 0; i < mc; i++) o[i] -= kmins(w, a, m0 + i, K);
        }
        for (int i = 0; i < mc; i++) y[(m0 + i) * N + n] = o[i];
    }
}
#endif

typedef struct {
    const uint8_t *w; int t; qinfo qi; int64_t row_bytes;
    qact a; float *y; int64_t M, N, K, per;
} qmm_ctx;

static void qmm_task(void *vctx, int64_t task) {
    const qmm_ctx *c = vctx;
    int64_t n0 = task * c->per, n1 = n0 + c->per < c->N ? n0 + c->per : c->N, K = c->K;
    int64_t nb = K / c->qi.qk;
    qrow r = {0};
    if (c->t != T_Q8_0) {
        /* scratch slot 2 (per thread): q[K] | d[nb] | dmin[nb] | mn[K/32] | sc[K/16] (int16) */
        size_t nfl = (size_t)(K / 4 + 2 * nb + K / 32 + K / 32 + 16);
        float *s = c6_scratch(2, nfl);
        if (!s) abort();
        r.q = (int8_t *)s;
        r.d = s + K / 4;
        r.dmin = r.d + nb;
        r.mn = (int32_t *)(r.dmin + nb);
        r.sc = (int16_t *)(r.mn + K / 32);
    }
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *raw = c->w + n * c->row_bytes;
#ifdef C6_X86_ROWS
        if (c->qi.kquant) unpack_row(c->t, raw, nb, &r);
        row_all_m_x86(c->t, &c->qi, raw, &r, &c->a, c->M, c->N, K, n, c->y);
#else
        if (c->t != T_Q8_0) unpack_row(c->t, raw, nb, &r);
        for (int64_t m = 0; m < c->M; m++) c->y[m * c->N + n] = row_dot(c->t, &c->qi, raw, &r, &c->a, m, K);
#endif
    }
}

int c6_qmatmul(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K) {
    qinfo qi;
    if (!info(wtype, &qi) || K <= 0 || K % qi.qk) return -1;
    if (M <= 0 || N <= 0) return 0;
    int64_t ab = qi.kquant ? 256 : 32;
    /* activations: q [M*K] int8 | d [M*K/ab] | bsum [M*K/16] (one malloc: M can be large) */
    size_t qbytes = ((size_t)(M * K) + 63) & ~(size_t)63;
    char *buf = malloc(qbytes + (size_t)(M * K / ab) * sizeof(float) + (size_t)(M * K / 16) * sizeof(int32_t));
    if (!buf) return -2;
    qact a = {(int8_t *)buf, (float *)(buf + qbytes), NULL};
    a.bsum = (int32_t *)(a.d + M * K / ab);
    for (int64_t m = 0; m < M; m++) {
        if (qi.kquant) quant_q8_K(x + m * K, a.q + m * K, a.d + m * (K / 256), a.bsum + m * (K / 16), K);
        else quant_q8_0(x + m * K, a.q + m * K, a.d + m * (K / 32), K);
    }
    int nt = c6_get_num_threads();
    int64_t per = (N + (int64_t)nt * 8 - 1) / ((int64_t)nt * 8);
    if (per < 16) per = 16;
    qmm_ctx c = {w, wtype, qi, K / qi.qk * qi.bytes, a, y, M, N, K, per};
    c6_parallel_for((N + per - 1) / per, qmm_task, &c);
    free(buf);
    return 0;
}

/* y[R,K] = dequantized rows (exact: the block formulas, in float) */
int c6_qdequant(const void *w, int wtype, float *y, int64_t R, int64_t K) {
    qinfo qi;
    if (!info(wtype, &qi) || K <= 0 || K % qi.qk) return -1;
    int64_t nb = K / qi.qk, row_bytes = nb * qi.bytes;
    int8_t *q = malloc((size_t)K);
    float *d = malloc(sizeof(float) * (size_t)(2 * nb));
    int16_t *sc = malloc(sizeof(int16_t) * (size_t)(K / 16));
    int32_t *mn = malloc(sizeof(int32_t) * (size_t)(K / 32));
    if (!q || !d || !sc || !mn) { free(q); free(d); free(sc); free(mn); return -2; }
    qrow r = {q, d, d + nb, sc, mn};
    for (int64_t i = 0; i < R; i++) {
        const uint8_t *raw = (const uint8_t *)w + i * row_bytes;
        float *o = y + i * K;
        if (wtype == T_Q8_0) {
            for (int64_t b = 0; b < nb; b++) {
                float db = c6_f16_to_f32(rd16(raw + b * 34));
                for (int j = 0; j < 32; j++) o[b * 32 + j] = db * (float)(int8_t)raw[b * 34 + 2 + j];
            }
            continue;
        }
        unpack_row(wtype, raw, nb, &r);
        for (int64_t k = 0; k < K; k++) {
            int64_t b = k / qi.qk;
            if (!qi.kquant) o[k] = d[b] * (float)q[k];
            else if (wtype == T_Q6_K) o[k] = d[b] * (float)sc[k / 16] * (float)q[k];
            else o[k] = d[b] * (float)sc[k / 16] * (float)q[k] - r.dmin[b] * (float)mn[k / 32];
        }
    }
    free(q); free(d); free(sc); free(mn);
    return 0;
}
