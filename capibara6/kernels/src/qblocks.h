/* Internal to the quantized-matmul sources: GGUF block formats (ggml type ids), fp16 scales,
 * row unpacking, and the SIMD helpers both activation precisions share. */
#ifndef CAPIBARA6_QBLOCKS_H
#define CAPIBARA6_QBLOCKS_H
#include "capibara6_kernels.h"
#include <math.h>
#include <stdlib.h>
#if defined(__AVX2__) && !C6_USE_NEON
#include <immintrin.h>
#define C6_QX86 1
#endif

enum { T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef struct {
    int qk;          /* values per block */
    int bytes;       /* bytes per block */
    int sub;         /* values per sub-block sharing one integer scale (== qk: one scale) */
    int kquant;      /* activations as Q8_K (1) or Q8_0 (0) */
} qinfo;


int c6_qinfo(int t, qinfo *q);

static inline uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* block scales: the hardware conversion where there is one (same value as c6_f16_to_f32) */
#if defined(__F16C__)
static inline float f16s(const uint8_t *p) { return _cvtsh_ss(rd16(p)); }
#elif defined(__aarch64__)
static inline float f16s(const uint8_t *p) { __fp16 h; memcpy(&h, p, 2); return (float)h; }
#else
static inline float f16s(const uint8_t *p) { return c6_f16_to_f32(rd16(p)); }
#endif

typedef struct {
    int8_t *q;       /* [K] values (k-quants with mins: unsigned 0..31; others signed) */
    float *d;        /* [K/qk] block scale */
    float *dmin;     /* [K/qk] block min scale (Q4_K/Q5_K) */
    int16_t *sc;     /* [K/16] scale of each 16 values (k-quants) */
    int32_t *mn;     /* [K/32] sub-block min (Q4_K/Q5_K) */
} qrow;

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

/* unpack nb blocks of a weight row of type t into r (Q8_0 too: values copied) */
void c6_unpack_row(int t, const uint8_t *restrict w, int64_t nb, qrow *r);
/* scratch slot `slot` carved into an unpacked row of K values (nb blocks) plus `extra` floats,
 * which are returned (aborts if the allocation fails) */
float *c6_qrow_scratch(int slot, int64_t K, int64_t nb, int64_t extra, qrow *r);
/* o[K] = the row's values (r: scratch for the unpacked row) */
void c6_dequant_row(int t, const uint8_t *restrict raw, int64_t K, qrow *r, float *restrict o);

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
#ifdef C6_QX86
static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#if defined(__FMA__)
#define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define FMADD(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
#endif

#ifdef C6_QX86
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
/* k-quant 256-block at b, 32-value group g (0..7) as int8 values in registers, with the integer
 * scale of its first and last 16 values and (Q4_K/Q5_K) the group's min */
static inline __attribute__((always_inline)) __m256i kgroup32(int t, const uint8_t *b, int g, int32_t *s0,
                                                              int32_t *s1, int32_t *mn) {
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    if (t == T_Q6_K) {
        int n = g / 4, k = g % 4;
        const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
        const int8_t *sc = (const int8_t *)(b + 192 + 8 * n + 2 * k);
        __m256i l = _mm256_loadu_si256((const __m256i *)(ql + (k & 1) * 32));
        __m256i h = _mm256_loadu_si256((const __m256i *)qh);
        l = k < 2 ? _mm256_and_si256(l, lo4) : _mm256_and_si256(_mm256_srli_epi16(l, 4), lo4);
        h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * k)), _mm256_set1_epi8(3));
        *s0 = sc[0];
        *s1 = sc[1];
        *mn = 0;
        return _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16(h, 4)), _mm256_set1_epi8(32));
    }
    int five = t == T_Q5_K;
    __m256i v = _mm256_loadu_si256((const __m256i *)(b + (five ? 48 : 16) + 32 * (g / 2)));
    v = (g & 1) ? _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4) : _mm256_and_si256(v, lo4);
    if (five) {
        __m256i h = _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(b + 16)), _mm_cvtsi32_si128(g));
        v = _mm256_or_si256(v, _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4));
    }
    kscale(b + 4, g, s0, mn);
    *s1 = *s0;
    return v;
}
#endif

/* llvm-mca regions (scripts/bench_neon_model.py): a model build (-DC6_MCA_MODEL) marks one
 * iteration of each hot loop with assembler comments named for its instantiation; other builds
 * emit nothing, so their code is unchanged. */
#if defined(C6_MCA_MODEL)
#define C6_MCA_BEGIN(kind, T, MC) __asm volatile("# LLVM-MCA-BEGIN c6_" kind "_t%c0_m%c1" ::"i"(T), "i"(MC))
#define C6_MCA_END(kind, T, MC) __asm volatile("# LLVM-MCA-END c6_" kind "_t%c0_m%c1" ::"i"(T), "i"(MC))
#else
#define C6_MCA_BEGIN(kind, T, MC) ((void)0)
#define C6_MCA_END(kind, T, MC) ((void)0)
#endif

#if C6_USE_NEON
/* NEON in-register block decoding (the counterpart of block32/kgroup32): 32 int8 values as two
 * vectors, values 0-15 in lo, 16-31 in hi */
typedef struct { int8x16_t lo, hi; } c6_i8x32;

/* 16 int8 products summed into 4 int32 lanes: sdot, or widening multiplies without dotprod
 * (|w| <= 128, |a| <= 127: two products fit in int16) */
static inline int32x4_t c6_dotv(int32x4_t acc, int8x16_t w, int8x16_t a) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, w, a);
#else
    int16x8_t p = vmull_s8(vget_low_s8(w), vget_low_s8(a));
    p = vmlal_s8(p, vget_high_s8(w), vget_high_s8(a));
    return vpadalq_s16(acc, p);
#endif
}

static inline c6_i8x32 c6_nib32(uint8x16_t v) {
    c6_i8x32 r = {vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(v, 4))};
    return r;
}

/* Q4_0 / Q5_0 / Q8_0 block at p. Q5_0: value = (nibble | bit5 << 4) - 16 = nibble | (bit5 ? 0 : 0xF0)
 * as a byte; bit j of the 32-bit qh is value j's: bytes of qh spread by tbl, tested by cmtst */
static inline __attribute__((always_inline)) c6_i8x32 c6_nblock32(int t, const uint8_t *p) {
    if (t == T_Q8_0) {
        c6_i8x32 r = {vld1q_s8((const int8_t *)p + 2), vld1q_s8((const int8_t *)p + 18)};
        return r;
    }
    c6_i8x32 r = c6_nib32(vld1q_u8(p + (t == T_Q4_0 ? 2 : 6)));
    if (t == T_Q4_0) {
        r.lo = vsubq_s8(r.lo, vdupq_n_s8(8));
        r.hi = vsubq_s8(r.hi, vdupq_n_s8(8));
        return r;
    }
    uint32_t qh;
    memcpy(&qh, p + 2, 4);
    const uint8x16_t i0 = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    const uint8x16_t bit = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
    uint8x16_t q = vreinterpretq_u8_u32(vdupq_n_u32(qh));
    uint8x16_t m0 = vtstq_u8(vqtbl1q_u8(q, i0), bit), m1 = vtstq_u8(vqtbl1q_u8(q, vaddq_u8(i0, vdupq_n_u8(2))), bit);
    const uint8x16_t f0 = vdupq_n_u8(0xF0);
    r.lo = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(r.lo), vbicq_u8(f0, m0)));
    r.hi = vreinterpretq_s8_u8(vorrq_u8(vreinterpretq_u8_s8(r.hi), vbicq_u8(f0, m1)));
    return r;
}

/* Q4_0 block at p as 16 (q - 8) (one op less than c6_nblock32: the nibbles xor 8 moved to the top
 * of a byte are 16 times their signed value); multiply the sums by 1/16, an exact scaling */
static inline c6_i8x32 c6_q4_0x16(const uint8_t *p) {
    uint8x16_t x = veorq_u8(vld1q_u8(p + 2), vdupq_n_u8(0x88));
    c6_i8x32 r = {vreinterpretq_s8_u8(vshlq_n_u8(x, 4)), vreinterpretq_s8_u8(vandq_u8(x, vdupq_n_u8(0xF0)))};
    return r;
}

/* the fp16 scales at p0 + r * stride (r = 0..3) as 4 floats (hardware conversion, = f16s) */
static inline float32x4_t c6_f16x4(const uint8_t *p0, int64_t stride) {
    uint64_t h = (uint64_t)rd16(p0) | (uint64_t)rd16(p0 + stride) << 16 | (uint64_t)rd16(p0 + 2 * stride) << 32 |
                 (uint64_t)rd16(p0 + 3 * stride) << 48;
    return vcvt_f32_f16(vreinterpret_f16_u64(vcreate_u64(h)));
}

/* Q4_K/Q5_K: the 8 6-bit scales (bytes 0-7) and mins (bytes 8-15) of the 12 bytes at s */
static inline uint8x16_t c6_kscales(const uint8_t *s) {
    uint32_t u[4];
    memcpy(u, s, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    uint32_t m = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = m;
    u[0] &= 0x3f3f3f3fu;
    return vreinterpretq_u8_u32(vld1q_u32(u));
}

/* k-quant 256-block at b, 32-value group g (0..7), as int8 values (Q4_K/Q5_K unsigned 0..31, Q6_K
 * unsigned q without its -32: callers subtract 32 x the activations' 16-value sums). Integer scales: Q4_K/Q5_K one per group (c6_kscales), Q6_K one per 16 (int8 at
 * b + 192 + 2g). qh: Q5_K's 32 high-bit bytes, Q6_K's 32-byte half holding group g. */
static inline __attribute__((always_inline)) c6_i8x32 c6_kgroup32(int t, const uint8_t *b, int g) {
    if (t == T_Q6_K) {
        int n = g / 4, k = g % 4;
        const uint8_t *ql = b + 64 * n + (k & 1) * 32, *qh = b + 128 + 32 * n;
        uint8x16_t l0 = vld1q_u8(ql), l1 = vld1q_u8(ql + 16), h0 = vld1q_u8(qh), h1 = vld1q_u8(qh + 16);
        const uint8x16_t lo4 = vdupq_n_u8(0x0F), three = vdupq_n_u8(3);
        if (k < 2) { l0 = vandq_u8(l0, lo4); l1 = vandq_u8(l1, lo4); }
        else { l0 = vshrq_n_u8(l0, 4); l1 = vshrq_n_u8(l1, 4); }
        switch (k) {  /* (qh >> 2k) & 3, shifted into bits 4-5 */
        case 0: h0 = vandq_u8(h0, three); h1 = vandq_u8(h1, three); break;
        case 1: h0 = vandq_u8(vshrq_n_u8(h0, 2), three); h1 = vandq_u8(vshrq_n_u8(h1, 2), three); break;
        case 2: h0 = vandq_u8(vshrq_n_u8(h0, 4), three); h1 = vandq_u8(vshrq_n_u8(h1, 4), three); break;
        default: h0 = vshrq_n_u8(h0, 6); h1 = vshrq_n_u8(h1, 6); break;
        }
        c6_i8x32 r = {vreinterpretq_s8_u8(vsliq_n_u8(l0, h0, 4)), vreinterpretq_s8_u8(vsliq_n_u8(l1, h1, 4))};
        return r;
    }
    int five = t == T_Q5_K;
    const uint8_t *qs = b + (five ? 48 : 16) + 32 * (g / 2);
    uint8x16_t v0 = vld1q_u8(qs), v1 = vld1q_u8(qs + 16);
    const uint8x16_t lo4 = vdupq_n_u8(0x0F);
    if (g & 1) { v0 = vshrq_n_u8(v0, 4); v1 = vshrq_n_u8(v1, 4); }
    else { v0 = vandq_u8(v0, lo4); v1 = vandq_u8(v1, lo4); }
    if (five) {  /* bit g of qh[l] is value l's fifth bit */
        const uint8x16_t m = vdupq_n_u8((uint8_t)(1u << g)), b4 = vdupq_n_u8(0x10);
        v0 = vorrq_u8(v0, vandq_u8(vtstq_u8(vld1q_u8(b + 16), m), b4));
        v1 = vorrq_u8(v1, vandq_u8(vtstq_u8(vld1q_u8(b + 32), m), b4));
    }
    c6_i8x32 r = {vreinterpretq_s8_u8(v0), vreinterpretq_s8_u8(v1)};
    return r;
}
#endif

#endif
