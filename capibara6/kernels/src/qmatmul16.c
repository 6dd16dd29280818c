/* Quantized-weight matmul with 16-bit activations: y[M,N] = x[M,K] @ W[N,K]^T, W in GGUF blocks.
 *
 * llama.cpp rounds activations to 8 bits (Q8_0/Q8_K) before every quantized matmul. That noise is
 * small per layer but it is re-drawn at each of them, and on small models (Gemma 3 270M) it moves
 * perplexity by a few percent and turns any tiny upstream difference (an fp16 KV cache, a flash
 * attention summation order) into different top-1 choices. Here each 32 activations keep 15 bits
 * plus sign (d = amax/32767): within ~1e-5 of fp32 arithmetic, at 16 multiply-adds per
 * instruction (madd_epi16) instead of fp32's 8, while weights are still read in their 4-8 bit
 * blocks. Every weight type is reduced to per-32 chunks: int8 values, one float multiplier for
 * each 16 (d*scale) and one for the chunk's min (Q4_K/Q5_K). */
#include "qblocks.h"

#if C6_USE_NEON && defined(__ARM_FEATURE_DOTPROD) && defined(__ARM_FEATURE_MATMUL_INT8)
#define C6_I16_I8MM 1  /* the int16 dot as sdot (high bytes) + usdot (low bytes) */
#endif

typedef struct {
    int16_t *q;      /* [M, K] */
    float *d;        /* [M, K/32] */
    int32_t *asum;   /* [M, K/32] sum of the chunk's q (for the mins of Q4_K/Q5_K) */
#ifdef C6_QX86
    int16_t *qx;     /* [M, K4 + 32] (K4 = K rounded up to 128, zeros past K): per 128 values, 8 vectors
                      * of 16, vector j = values 4j..4j+3 of each of the 4 groups; rows 64 bytes more
                      * than a multiple of 256 apart so 8 rows never share an L1 set (K = 2048) */
    float *d2;       /* [M, K4/16] d of each group twice (0 past K) */
    float *dsx;      /* [M, K4/32] d * asum (Q4_K/Q5_K) */
#endif
#ifdef C6_I16_I8MM
    int8_t *hi;      /* [M, K] q >> 8 (signed) */
    uint8_t *lo;     /* [M, K] q & 255: q = 256 hi + lo exactly */
    float *dasum;    /* [M, K/32] d * asum */
    int32_t *a32;    /* [M, K/16] 32 x the sum of each 16 q (Q6_K's -32) */
    float *dt;       /* [ceil(M/4)][K/32][4] d of 4 consecutive rows side by side */
    int32_t *h8;     /* Q4_0: [M, K/32, 4 copies, 4 lanes] -2 x the sum of the chunk's hi (-8 sum over 4 lanes) */
    float *l8t;      /* Q4_0: as dt, 8 x the sum of the chunk's lo */
    int8_t *hp;      /* 32-block types, M >= 4: [M/2][K/8][2][8] hi of row pairs interleaved per 8 values */
    uint8_t *lp;     /* the same for lo */
    float *dp;       /* [M/2][K/32][4] d of row pairs as [d0, d0, d1, d1] */
    int32_t *h8p;    /* Q4_0: [M/2][K/32][4] -8 sum(hi) of row pairs, same lanes */
    float *l8p;      /* Q4_0: 8 sum(lo), same lanes */
    float *dsp;      /* Q4_K: dasum of row pairs, same lanes */
#endif
} act16;

static void quant_q16(const float *restrict x, int16_t *restrict q, float *restrict d,
                      int32_t *restrict asum, int64_t K) {
    for (int64_t c = 0; c < K / 32; c++) {
        const float *xc = x + c * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xc[j]));
        float id = amax != 0.0f ? 32767.0f / amax : 0.0f;
        d[c] = amax / 32767.0f;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) {
            float v = fminf(fmaxf(rintf(xc[j] * id), -32767.0f), 32767.0f);
            q[c * 32 + j] = (int16_t)v;
            s += (int32_t)v;
        }
        asum[c] = s;
    }
}

/* per 32-value chunk: multiplier of the first 16 values' sum (fa), of the last 16 (fb), of the
 * activation sum (fm, the k-quant min) */
typedef struct { float *fa, *fb, *fm; } chunks;

static void chunk_scales(int t, const qrow *r, int64_t K, chunks *cs) {
    for (int64_t c = 0; c < K / 32; c++) {
        if (t != T_Q4_K && t != T_Q5_K && t != T_Q6_K) {
            cs->fa[c] = cs->fb[c] = r->d[c];
            cs->fm[c] = 0.0f;
            continue;
        }
        int64_t b = c / 8, j = c % 8;
        cs->fa[c] = r->d[b] * (float)r->sc[b * 16 + 2 * j];
        cs->fb[c] = r->d[b] * (float)r->sc[b * 16 + 2 * j + 1];
        cs->fm[c] = t == T_Q6_K ? 0.0f : r->dmin[b] * (float)r->mn[b * 8 + j];
    }
}

/* integer sums of 16 products: w int8, a int16 */
static inline void sums16(const int8_t *w, const int16_t *a, int32_t *lo, int32_t *hi) {
#if C6_USE_NEON
    int8x16_t w0 = vld1q_s8(w), w1 = vld1q_s8(w + 16);
    int32x4_t l = vmull_s16(vget_low_s16(vmovl_s8(vget_low_s8(w0))), vld1_s16(a));
    l = vmlal_s16(l, vget_high_s16(vmovl_s8(vget_low_s8(w0))), vld1_s16(a + 4));
    l = vmlal_s16(l, vget_low_s16(vmovl_s8(vget_high_s8(w0))), vld1_s16(a + 8));
    l = vmlal_s16(l, vget_high_s16(vmovl_s8(vget_high_s8(w0))), vld1_s16(a + 12));
    int32x4_t h = vmull_s16(vget_low_s16(vmovl_s8(vget_low_s8(w1))), vld1_s16(a + 16));
    h = vmlal_s16(h, vget_high_s16(vmovl_s8(vget_low_s8(w1))), vld1_s16(a + 20));
    h = vmlal_s16(h, vget_low_s16(vmovl_s8(vget_high_s8(w1))), vld1_s16(a + 24));
    h = vmlal_s16(h, vget_high_s16(vmovl_s8(vget_high_s8(w1))), vld1_s16(a + 28));
    *lo = vaddvq_s32(l);
    *hi = vaddvq_s32(h);
#else
    int32_t l = 0, h = 0;
    for (int j = 0; j < 16; j++) l += (int32_t)w[j] * (int32_t)a[j];
    for (int j = 0; j < 16; j++) h += (int32_t)w[16 + j] * (int32_t)a[16 + j];
    *lo = l;
    *hi = h;
#endif
}

static float row_dot16(const int8_t *w, const chunks *cs, const act16 *a, int64_t m, int64_t K) {
    int64_t nc = K / 32;
    const int16_t *aq = a->q + m * K;
    const float *ad = a->d + m * nc;
    const int32_t *as = a->asum + m * nc;
    float sum = 0.0f;
    for (int64_t c = 0; c < nc; c++) {
        int32_t lo, hi;
        sums16(w + c * 32, aq + c * 32, &lo, &hi);
        sum += ad[c] * (cs->fa[c] * (float)lo + cs->fb[c] * (float)hi - cs->fm[c] * (float)as[c]);
    }
    return sum;
}

#ifdef C6_QX86
/* x86: one weight row against up to C6_X86_ROWS activation rows per pass, every block type decoded
 * in registers once per pass. 4 consecutive 32-value groups are taken together, weights and
 * activations both laid out as 8 vectors of 16 int16: vector j holds values 4j..4j+3 of each of the
 * 4 groups (activations rearranged once per call, a->qx; weights by two unpack levels). 8 madd
 * (VNNI: 1 madd + 7 dpwssd) into one register then give lanes [g0, g0, g1, g1, g2, g2, g3, g3],
 * each the exact int32 sum of 16 products (|sum| < 2^31 for every type, Q6_K's 32 x 128 x 32767 x
 * 16 included), converted and multiplied by [d_a(g) * d_w(g)] with one FMA per 4 groups. The
 * float steps depend only on that row pair, never on M or on the rows sharing the pass (M = 1 runs
 * the same code). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define C6_DPWSSD(acc, w, x) _mm256_dpwssd_epi32(acc, w, x)
#elif defined(__AVXVNNI__)
#define C6_DPWSSD(acc, w, x) _mm256_dpwssd_avx_epi32(acc, w, x)
#else
#define C6_DPWSSD(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#endif
#if defined(__AVX512VL__)
#define C6_X86_ROWS 8  /* 32 vector registers */
#else
#define C6_X86_ROWS 4
#endif
#if defined(__FMA__)
#define FMADD4(a, b, c) _mm_fmadd_ps(a, b, c)
#else
#define FMADD4(a, b, c) _mm_add_ps(_mm_mul_ps(a, b), c)
#endif

static inline float hsum4_ps(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 4 groups of 32 int8 (values 0-15 low lane, 16-31 high) -> W[j] = int16 values 4j..4j+3 of g0..g3 */
static inline __attribute__((always_inline)) void interleave4(const __m256i *w, __m256i *W) {
    __m256i a = _mm256_unpacklo_epi32(w[0], w[1]), b = _mm256_unpackhi_epi32(w[0], w[1]);
    __m256i c = _mm256_unpacklo_epi32(w[2], w[3]), d = _mm256_unpackhi_epi32(w[2], w[3]);
    /* dword k of group g: lane k/4, position k%4; unpack lo/hi 32 gives positions {0,1} / {2,3} */
    __m256i v[4] = {_mm256_unpacklo_epi64(a, c), _mm256_unpackhi_epi64(a, c), _mm256_unpacklo_epi64(b, d),
                    _mm256_unpackhi_epi64(b, d)};  /* v[p]: dword p (low lane) and p + 4 (high lane) of g0..g3 */
    for (int p = 0; p < 4; p++) {
        W[p] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v[p]));
        W[p + 4] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v[p], 1));
    }
}

/* the MC activation rows against 4 interleaved groups starting at group c */
static inline __attribute__((always_inline)) void groups4(const __m256i *W, __m256 fw8, __m128 fm4, int mins,
                                                          const act16 *a, int64_t K4, int64_t m0, int64_t c,
                                                          const int MC, __m256 *acc, __m128 *macc) {
    for (int i = 0; i < MC; i++) {
        int64_t m = m0 + i;
        const int16_t *ap = a->qx + m * (K4 + 32) + c * 32;
        /* two chains (latency); integer sums, so the split changes nothing */
        __m256i S0 = _mm256_madd_epi16(W[0], _mm256_loadu_si256((const __m256i *)ap));
        __m256i S1 = _mm256_madd_epi16(W[1], _mm256_loadu_si256((const __m256i *)(ap + 16)));
        for (int j = 2; j < 8; j += 2) {
            S0 = C6_DPWSSD(S0, W[j], _mm256_loadu_si256((const __m256i *)(ap + 16 * j)));
            S1 = C6_DPWSSD(S1, W[j + 1], _mm256_loadu_si256((const __m256i *)(ap + 16 * j + 16)));
        }
        __m256i S = _mm256_add_epi32(S0, S1);
        __m256 da = _mm256_loadu_ps(a->d2 + m * (K4 / 16) + c * 2);
        acc[i] = FMADD(_mm256_cvtepi32_ps(S), _mm256_mul_ps(da, fw8), acc[i]);
        if (mins) macc[i] = FMADD4(_mm_loadu_ps(a->dsx + m * (K4 / 32) + c), fm4, macc[i]);
    }
}

static inline __attribute__((always_inline)) void rows16(int t, int bytes, const uint8_t *raw, const act16 *a,
                                                         int64_t K, int64_t m0, const int MC, float *out) {
    int64_t nc = K / 32, K4 = (nc + 3) / 4 * 128;
    int kq = t == T_Q4_K || t == T_Q5_K || t == T_Q6_K, mins = t == T_Q4_K || t == T_Q5_K;
    __m256 acc[C6_X86_ROWS];
    __m128 macc[C6_X86_ROWS];
    for (int i = 0; i < MC; i++) {
        acc[i] = _mm256_setzero_ps();
        macc[i] = _mm_setzero_ps();
    }
    __m256i w[4], W[8];
    if (kq) {
        for (int64_t b = 0; b < nc / 8; b++) {
            const uint8_t *blk = raw + b * bytes;
            __m256 fw8 = _mm256_set1_ps(f16s(blk + (t == T_Q6_K ? 208 : 0)));
            float dmin = mins ? f16s(blk + 2) : 0.0f;
            uint32_t sc[2] = {0, 0}, mw[2] = {0, 0};  /* Q4_K/Q5_K: 6-bit scales / mins of groups 0-3, 4-7 */
            __m256i q6s = _mm256_setzero_si256();     /* Q6_K: its 16 int8 scales of this half, as int16 */
            if (mins) {
                uint32_t u[3];
                memcpy(u, blk + 4, 12);
                sc[0] = u[0] & 0x3f3f3f3fu;
                sc[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
                mw[0] = u[1] & 0x3f3f3f3fu;
                mw[1] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
#pragma GCC unroll 4
                for (int g = 0; g < 4; g++) {
                    int32_t d0, d1, d2;
                    w[g] = kgroup32(t, blk, 4 * h + g, &d0, &d1, &d2);
                }
                interleave4(w, W);
                /* sub-block scales folded in (|q * sc| <= 32 * 128): W[0..3] hold values 0-15 of each
                 * group, W[4..7] values 16-31; scale vectors [s(g0) x4, .., s(g3) x4] as int16 */
                __m256i S0, S1;
                if (t == T_Q6_K) {  /* int8 scales at 192 + 8h: [s0(g0), s1(g0), s0(g1), ..] */
                    q6s = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(blk + 192 + 8 * h))));
                    S0 = _mm256_shuffle_epi8(q6s, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 4, 5, 4, 5, 4, 5, 4, 5, 8, 9, 8, 9, 8, 9, 8,
                                                                   9, 12, 13, 12, 13, 12, 13, 12, 13));
                    S1 = _mm256_shuffle_epi8(q6s, _mm256_setr_epi8(2, 3, 2, 3, 2, 3, 2, 3, 6, 7, 6, 7, 6, 7, 6, 7, 10, 11, 10, 11, 10,
                                                                   11, 10, 11, 14, 15, 14, 15, 14, 15, 14, 15));
                } else {
                    const char z = (char)0x80;
                    S0 = S1 = _mm256_shuffle_epi8(_mm256_set1_epi32((int)sc[h]),
                                                  _mm256_setr_epi8(0, z, 0, z, 0, z, 0, z, 1, z, 1, z, 1, z, 1, z, 2, z, 2, z, 2, z, 2,
                                                                   z, 3, z, 3, z, 3, z, 3, z));
                }
                for (int j = 0; j < 8; j++) W[j] = _mm256_mullo_epi16(W[j], j < 4 ? S0 : S1);
                __m128 fm4 = mins ? _mm_mul_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)mw[h]))))
                                  : _mm_setzero_ps();
                groups4(W, fw8, fm4, mins, a, K4, m0, b * 8 + 4 * h, MC, acc, macc);
            }
        }
    } else {
        const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (int64_t c = 0; c < nc; c += 4) {
            int G = nc - c < 4 ? (int)(nc - c) : 4;
            uint64_t h4 = 0;  /* the 4 blocks' fp16 scales (0 past the row's end) */
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                if (g < G) {
                    w[g] = block32(t, raw + (c + g) * bytes);
                    h4 |= (uint64_t)rd16(raw + (c + g) * bytes) << (16 * g);
                } else w[g] = _mm256_setzero_si256();
            }
#if defined(__F16C__)
            __m128 fw = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h4));
#else
            __m128 fw = _mm_setr_ps(c6_f16_to_f32((uint16_t)h4), c6_f16_to_f32((uint16_t)(h4 >> 16)),
                                    c6_f16_to_f32((uint16_t)(h4 >> 32)), c6_f16_to_f32((uint16_t)(h4 >> 48)));
#endif
            __m256 fw8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(fw), dup);
            interleave4(w, W);
            groups4(W, fw8, _mm_setzero_ps(), 0, a, K4, m0, c, MC, acc, macc);
        }
    }
    for (int i = 0; i < MC; i++) out[i] = mins ? hsum_ps(acc[i]) - hsum4_ps(macc[i]) : hsum_ps(acc[i]);
}
#endif

#ifdef C6_I16_I8MM
/* NEON with i8mm: each int16 activation is split once into a signed high byte and an unsigned low
 * byte, so w.a = 256 (w.hi) + (w.lo) exactly: sdot for the first, usdot (unsigned x signed) for the
 * second, accumulated onto the first shifted by 8. Blocks decoded in registers; a vector float
 * accumulator per row, one float multiplier per 32 (Q6_K: 16) values as a vector lane. */
static inline int32x4_t dot32_i16(int32x4_t z, int8x16_t w0, int8x16_t w1, const int8_t *h, const uint8_t *l) {
    int32x4_t s = vdotq_s32(vdotq_s32(z, w0, vld1q_s8(h)), w1, vld1q_s8(h + 16));
    return vusdotq_s32(vusdotq_s32(vshlq_n_s32(s, 8), vld1q_u8(l), w0), vld1q_u8(l + 16), w1);
}
static inline int32x4_t dot16_i16(int8x16_t w, const int8_t *h, const uint8_t *l) {
    return vusdotq_s32(vshlq_n_s32(vdotq_s32(vdupq_n_s32(0), w, vld1q_s8(h)), 8), vld1q_u8(l), w);
}

/* up to 4 activation rows against one weight row's 32-blocks; each (weight row, activation row)
 * computed as in q0_4rows16_neon (see q0_rows_neon in qmatmul.c): results independent of M */
static inline __attribute__((always_inline)) void q0_rows16_neon(int t, int bs, const uint8_t *raw, const act16 *a,
                                                                 int64_t K, int64_t m0, const int MC, float *out) {
    int64_t nc = K / 32;
    float32x4_t acc = vdupq_n_f32(0.0f);
    const float *dt = a->dt + (m0 / 4) * nc * 4, *l8 = a->l8t + (m0 / 4) * nc * 4;
    for (int64_t c = 0; c < nc; c++) {
        C6_MCA_BEGIN("i16", t, MC);
        const uint8_t *p = raw + c * bs;
        /* Q4_0: the nibbles q as they are; sum((q - 8) a) = 256 (sum(q hi) - 8 sum(hi)) + sum(q lo)
         * - 8 sum(lo): the high part starts at -8 sum(hi) (exact), the low part's term in float */
        c6_i8x32 w = t == T_Q4_0 ? c6_nib32(vld1q_u8(p + 2)) : c6_nblock32(t, p);
        int32x4_t s[4];
        for (int i = 0; i < 4; i++) {
            int64_t o = (m0 + i) * K + c * 32;
            int32x4_t z = t == T_Q4_0 && i < MC ? vld1q_s32(a->h8 + ((m0 + i) * nc + c) * 16) : vdupq_n_s32(0);
            s[i] = i < MC ? dot32_i16(z, w.lo, w.hi, a->hi + o, a->lo + o) : vdupq_n_s32(0);
        }
        int32x4_t S = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
        float32x4_t f = vmulq_n_f32(vld1q_f32(dt + c * 4), f16s(p));
        acc = vfmaq_f32(acc, vcvtq_f32_s32(S), f);
        if (t == T_Q4_0) acc = vfmsq_f32(acc, f, vld1q_f32(l8 + c * 4));
        C6_MCA_END("i16", t, MC);
    }
    float o[4];
    vst1q_f32(o, acc);
    for (int i = 0; i < MC; i++) out[i] = o[i];
}

/* one activation row (decode), 4 weight rows per pass (rs bytes apart), as q0_4rows_neon for 8 bits */
static inline __attribute__((always_inline)) void q0_4rows16_neon(int t, int bs, const uint8_t *raw, int64_t rs,
                                                                  const act16 *a, int64_t K, float *out) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t c = 0; c < K / 32; c++) {
        C6_MCA_BEGIN("i16n4", t, 1);
        const uint8_t *p = raw + c * bs;
        int8x16_t h0 = vld1q_s8(a->hi + c * 32), h1 = vld1q_s8(a->hi + c * 32 + 16);
        uint8x16_t l0 = vld1q_u8(a->lo + c * 32), l1 = vld1q_u8(a->lo + c * 32 + 16);
        int32x4_t s[4];
        for (int r = 0; r < 4; r++) {  /* Q4_0 as q0_rows16_neon; each row's start loaded from its own
                                        * copy (a load, where a register copy would take a vector pipe) */
            c6_i8x32 w = t == T_Q4_0 ? c6_nib32(vld1q_u8(p + r * rs + 2)) : c6_nblock32(t, p + r * rs);
            int32x4_t z = t == T_Q4_0 ? vld1q_s32(a->h8 + c * 16 + r * 4) : vdupq_n_s32(0);
            int32x4_t h = vdotq_s32(vdotq_s32(z, w.lo, h0), w.hi, h1);
            s[r] = vusdotq_s32(vusdotq_s32(vshlq_n_s32(h, 8), l0, w.lo), l1, w.hi);
        }
        int32x4_t S = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
        float32x4_t f = vmulq_n_f32(c6_f16x4(p, rs), a->d[c]);
        acc = vfmaq_f32(acc, vcvtq_f32_s32(S), f);
        if (t == T_Q4_0) acc = vfmsq_f32(acc, f, vdupq_n_f32(a->l8t[c * 4]));
        C6_MCA_END("i16n4", t, 1);
    }
    vst1q_f32(out, acc);
}

/* M >= 4: 2 weight rows x 4 activation rows per pass with smmla (high bytes) and usmmla (low
 * bytes), as q0_mmla_neon in qmatmul.c: a->hp / a->lp hold row pairs interleaved per 8 values.
 * Per element the same exact sums and float steps as q0_rows16_neon. */
static inline __attribute__((always_inline)) void q0_mmla16_neon(int t, int bs, const uint8_t *raw, int64_t rs,
                                                                 const act16 *a, int64_t K, int64_t m0, float *o8) {
    int64_t nc = K / 32;
    float32x4_t acc[2] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int64_t c = 0; c < nc; c++) {
        C6_MCA_BEGIN("i16n2", t, 4);
        const uint8_t *p = raw + c * bs;
        c6_i8x32 u = t == T_Q4_0 ? c6_nib32(vld1q_u8(p + 2)) : c6_nblock32(t, p);
        c6_i8x32 v = t == T_Q4_0 ? c6_nib32(vld1q_u8(p + rs + 2)) : c6_nblock32(t, p + rs);
        int64x2_t ul = vreinterpretq_s64_s8(u.lo), vl = vreinterpretq_s64_s8(v.lo);
        int64x2_t uh = vreinterpretq_s64_s8(u.hi), vh = vreinterpretq_s64_s8(v.hi);
        int8x16_t B[4] = {vreinterpretq_s8_s64(vzip1q_s64(ul, vl)), vreinterpretq_s8_s64(vzip2q_s64(ul, vl)),
                          vreinterpretq_s8_s64(vzip1q_s64(uh, vh)), vreinterpretq_s8_s64(vzip2q_s64(uh, vh))};
        uint64_t h2 = (uint64_t)rd16(p) | (uint64_t)rd16(p + rs) << 16;  /* d of weight rows [0, 1, 0, 1] */
        float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u64(vcreate_u64(h2 | h2 << 32)));
        for (int q = 0; q < 2; q++) {
            int64_t pr = m0 / 2 + q, o = pr * 2 * K + c * 64, j = (pr * nc + c) * 4;
            const int8_t *h = a->hp + o;
            const uint8_t *l = a->lp + o;
            int32x4_t z = t == T_Q4_0 ? vld1q_s32(a->h8p + j) : vdupq_n_s32(0);
            int32x4_t H = vmmlaq_s32(vmmlaq_s32(z, vld1q_s8(h), B[0]), vld1q_s8(h + 16), B[1]);
            H = vmmlaq_s32(vmmlaq_s32(H, vld1q_s8(h + 32), B[2]), vld1q_s8(h + 48), B[3]);
            int32x4_t S = vusmmlaq_s32(vusmmlaq_s32(vshlq_n_s32(H, 8), vld1q_u8(l), B[0]), vld1q_u8(l + 16), B[1]);
            S = vusmmlaq_s32(vusmmlaq_s32(S, vld1q_u8(l + 32), B[2]), vld1q_u8(l + 48), B[3]);
            float32x4_t f = vmulq_f32(vld1q_f32(a->dp + j), dw);
            acc[q] = vfmaq_f32(acc[q], vcvtq_f32_s32(S), f);
            if (t == T_Q4_0) acc[q] = vfmsq_f32(acc[q], f, vld1q_f32(a->l8p + j));
        }
        C6_MCA_END("i16n2", t, 4);
    }
    vst1q_f32(o8, acc[0]);
    vst1q_f32(o8 + 4, acc[1]);
}

/* a k-quant block's float multipliers: d * scale per 32 (Q6_K: per 16) values, dmin * min per 32 */
static inline __attribute__((always_inline)) void kscales16(int t, const uint8_t *blk, float32x4_t *dsc,
                                                            float32x4_t *dmn) {
    if (t != T_Q6_K) {
        uint8x16_t sm = c6_kscales(blk + 4);
        uint16x8_t s16 = vmovl_u8(vget_low_u8(sm)), m16 = vmovl_u8(vget_high_u8(sm));
        float d = f16s(blk), dmin = f16s(blk + 2);
        dsc[0] = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(s16))), d);
        dsc[1] = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_high_u16(s16))), d);
        dmn[0] = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_low_u16(m16))), dmin);
        dmn[1] = vmulq_n_f32(vcvtq_f32_u32(vmovl_u16(vget_high_u16(m16))), dmin);
    } else {
        int8x16_t s8 = vld1q_s8((const int8_t *)blk + 192);
        int16x8_t l = vmovl_s8(vget_low_s8(s8)), h = vmovl_s8(vget_high_s8(s8));
        float d = f16s(blk + 208);
        dsc[0] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(l))), d);
        dsc[1] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(l))), d);
        dsc[2] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))), d);
        dsc[3] = vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(h))), d);
    }
}

/* [x_u[k], x_v[k], x_u[k], x_v[k]]: weight-row lanes of an mmla result for scale k of rows u, v */
static inline float32x4_t jlanes(const float32x4_t *xu, const float32x4_t *xv, int k) {
    float32x4_t z = (k & 2) ? vzip2q_f32(xu[k / 4], xv[k / 4]) : vzip1q_f32(xu[k / 4], xv[k / 4]);
    float64x2_t d = vreinterpretq_f64_f32(z);
    return vreinterpretq_f32_f64((k & 1) ? vdupq_laneq_f64(d, 1) : vdupq_laneq_f64(d, 0));
}

/* M >= 2, Q4_K/Q5_K: 2 weight rows x 2 activation rows per pass on smmla/usmmla. Per element
 * exactly rows16_neon's arithmetic: one float accumulator per lane position of its acc/acc1 (G[l]:
 * acc lane l, G[4 + l]: acc1 lane l: group g in G[g]), summed at the end in vaddvq's order. */
static inline __attribute__((always_inline)) void qk_mmla16_neon(int t, int bytes, const uint8_t *raw, int64_t rs,
                                                                 const act16 *a, int64_t K, int64_t pr, float *o4) {
    int64_t nc = K / 32;
    float32x4_t G[8];
    for (int k = 0; k < 8; k++) G[k] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nc / 8; b++) {
        C6_MCA_BEGIN("i16n2", t, 2);
        const uint8_t *bu = raw + b * bytes, *bv = bu + rs;
        float32x4_t su[4], sv[4], mu[2], mv[2];
        kscales16(t, bu, su, mu);
        kscales16(t, bv, sv, mv);
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            c6_i8x32 u = c6_kgroup32(t, bu, g), v = c6_kgroup32(t, bv, g);
            int64x2_t ul = vreinterpretq_s64_s8(u.lo), vl = vreinterpretq_s64_s8(v.lo);
            int64x2_t uh = vreinterpretq_s64_s8(u.hi), vh = vreinterpretq_s64_s8(v.hi);
            int8x16_t B0 = vreinterpretq_s8_s64(vzip1q_s64(ul, vl)), B1 = vreinterpretq_s8_s64(vzip2q_s64(ul, vl));
            int8x16_t B2 = vreinterpretq_s8_s64(vzip1q_s64(uh, vh)), B3 = vreinterpretq_s8_s64(vzip2q_s64(uh, vh));
            int64_t c = b * 8 + g, o = pr * 2 * K + c * 64;
            const int8_t *h = a->hp + o;
            const uint8_t *l = a->lp + o;
            float32x4_t da = vld1q_f32(a->dp + (pr * nc + c) * 4);  /* [d_i0, d_i0, d_i1, d_i1] of chunk c */
            int32x4_t H = vmmlaq_s32(vmmlaq_s32(vdupq_n_s32(0), vld1q_s8(h), B0), vld1q_s8(h + 16), B1);
            H = vmmlaq_s32(vmmlaq_s32(H, vld1q_s8(h + 32), B2), vld1q_s8(h + 48), B3);
            int32x4_t S = vusmmlaq_s32(vusmmlaq_s32(vshlq_n_s32(H, 8), vld1q_u8(l), B0), vld1q_u8(l + 16), B1);
            S = vusmmlaq_s32(vusmmlaq_s32(S, vld1q_u8(l + 32), B2), vld1q_u8(l + 48), B3);
            G[g] = vfmaq_f32(G[g], vcvtq_f32_s32(S), vmulq_f32(da, jlanes(su, sv, g)));
            G[g] = vfmsq_f32(G[g], vld1q_f32(a->dsp + (pr * nc + c) * 4), jlanes(mu, mv, g));
        }
        C6_MCA_END("i16n2", t, 2);
    }
    float32x4_t T0 = vaddq_f32(G[0], G[4]), T1 = vaddq_f32(G[1], G[5]), T2 = vaddq_f32(G[2], G[6]),
                T3 = vaddq_f32(G[3], G[7]);
    vst1q_f32(o4, vaddq_f32(vaddq_f32(T0, T1), vaddq_f32(T2, T3)));
}

static inline __attribute__((always_inline)) void rows16_neon(int t, int bytes, const uint8_t *raw, const act16 *a,
                                                              int64_t K, int64_t m0, const int MC, float *out) {
    int64_t nc = K / 32;
    float32x4_t acc[4], acc1[4];
    for (int i = 0; i < 4; i++) acc[i] = acc1[i] = vdupq_n_f32(0.0f);
    if (t == T_Q4_0 || t == T_Q5_0 || t == T_Q8_0) {
        q0_rows16_neon(t, bytes, raw, a, K, m0, MC, out);
        return;
    }
    const int mins = t != T_Q6_K;
    for (int64_t b = 0; b < nc / 8; b++) {
        C6_MCA_BEGIN("i16", t, MC);
        const uint8_t *blk = raw + b * bytes;
        float32x4_t dsc[4], dmn[2];  /* d * scale per 32 (Q6_K: per 16) values, dmin * min per 32 */
        kscales16(t, blk, dsc, dmn);
        int32x4_t part[4][4];
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            c6_i8x32 w = c6_kgroup32(t, blk, g);
            for (int i = 0; i < MC; i++) {
                int64_t o = (m0 + i) * K + b * 256 + g * 32;
                int32x4_t p;
                if (mins) p = dot32_i16(vdupq_n_s32(0), w.lo, w.hi, a->hi + o, a->lo + o);
                else p = vpaddq_s32(dot16_i16(w.lo, a->hi + o, a->lo + o), dot16_i16(w.hi, a->hi + o + 16, a->lo + o + 16));
                part[i][g / 2] = (g & 1) ? vpaddq_s32(part[i][g / 2], p) : p;
            }
        }
        for (int i = 0; i < MC; i++) {
            int64_t ci = (m0 + i) * nc + b * 8;
            float32x4_t da0 = vld1q_f32(a->d + ci), da1 = vld1q_f32(a->d + ci + 4);
            if (mins) {  /* lane j of a pairwise add of the pairs: group j's exact sum */
                acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(vpaddq_s32(part[i][0], part[i][1])), vmulq_f32(da0, dsc[0]));
                acc1[i] = vfmaq_f32(acc1[i], vcvtq_f32_s32(vpaddq_s32(part[i][2], part[i][3])), vmulq_f32(da1, dsc[1]));
                acc[i] = vfmsq_f32(acc[i], vld1q_f32(a->dasum + ci), dmn[0]);
                acc1[i] = vfmsq_f32(acc1[i], vld1q_f32(a->dasum + ci + 4), dmn[1]);
            } else {     /* part[k] lanes: 16-value sums 4k..4k+3, of chunks 2k, 2k, 2k+1, 2k+1;
                          * sum((q - 32) a) = sum(q a) - 32 sum(a) */
                const int32_t *a32 = a->a32 + (m0 + i) * (K / 16) + b * 16;
                acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(vsubq_s32(part[i][0], vld1q_s32(a32))),
                                   vmulq_f32(vzip1q_f32(da0, da0), dsc[0]));
                acc1[i] = vfmaq_f32(acc1[i], vcvtq_f32_s32(vsubq_s32(part[i][1], vld1q_s32(a32 + 4))),
                                    vmulq_f32(vzip2q_f32(da0, da0), dsc[1]));
                acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(vsubq_s32(part[i][2], vld1q_s32(a32 + 8))),
                                   vmulq_f32(vzip1q_f32(da1, da1), dsc[2]));
                acc1[i] = vfmaq_f32(acc1[i], vcvtq_f32_s32(vsubq_s32(part[i][3], vld1q_s32(a32 + 12))),
                                    vmulq_f32(vzip2q_f32(da1, da1), dsc[3]));
            }
        }
        C6_MCA_END("i16", t, MC);
    }
    for (int i = 0; i < MC; i++) out[i] = vaddvq_f32(vaddq_f32(acc[i], acc1[i]));
}
#endif

typedef struct {
    const uint8_t *w; int t; qinfo qi; int64_t row_bytes;
    act16 a; float *y; int64_t M, N, K, per;
} q16_ctx;

static void q16_task(void *vctx, int64_t task) {
    const q16_ctx *c = vctx;
    int64_t n0 = task * c->per, n1 = n0 + c->per < c->N ? n0 + c->per : c->N, K = c->K;
#if defined(C6_QX86) || defined(C6_I16_I8MM)
#ifdef C6_QX86
#define ROWS16_FN rows16
#else
#define ROWS16_FN rows16_neon
#endif
    int64_t n = n0;
#ifdef C6_I16_I8MM
    if (c->M == 1 && !c->qi.kquant) {  /* decode: 4 weight rows per pass (n0 % 4 == 0: see per) */
        float o[4];
        for (; n + 4 <= n1; n += 4) {
            const uint8_t *raw = c->w + n * c->row_bytes;
            switch (c->t) {
            case T_Q4_0: q0_4rows16_neon(T_Q4_0, 18, raw, c->row_bytes, &c->a, K, o); break;
            case T_Q5_0: q0_4rows16_neon(T_Q5_0, 22, raw, c->row_bytes, &c->a, K, o); break;
            default: q0_4rows16_neon(T_Q8_0, 34, raw, c->row_bytes, &c->a, K, o); break;
            }
            memcpy(c->y + n, o, sizeof o);
        }
    }
    /* Q4_K: 2 weight rows x 2 activation rows per pass (modelled 22.0 -> 18.0 cycles per 256 at M=4;
     * Q5_K gained nothing and Q6_K lost, so they keep rows16_neon) */
    if (c->M >= 2 && c->t == T_Q4_K) {
        int64_t M2 = c->M / 2 * 2, N = c->N;
        float o[4];
        for (; n + 2 <= n1; n += 2) {
            const uint8_t *raw = c->w + n * c->row_bytes;
            for (int64_t pr = 0; pr < M2 / 2; pr++) {
                qk_mmla16_neon(T_Q4_K, 144, raw, c->row_bytes, &c->a, K, pr, o);
                c->y[(2 * pr) * N + n] = o[0];
                c->y[(2 * pr) * N + n + 1] = o[1];
                c->y[(2 * pr + 1) * N + n] = o[2];
                c->y[(2 * pr + 1) * N + n + 1] = o[3];
            }
            for (int k = 0; k < 2 && M2 < c->M; k++) {  /* an odd last row */
                const uint8_t *rk = raw + k * c->row_bytes;
                rows16_neon(T_Q4_K, 144, rk, &c->a, K, M2, 1, o);
                c->y[M2 * N + n + k] = o[0];
            }
        }
    }
    if (c->M >= 4 && !c->qi.kquant) {  /* 2 weight rows x 4 activation rows per pass (n0 % 4 == 0) */
        int64_t M4 = c->M / 4 * 4, N = c->N;
        float o[8];
        for (; n + 2 <= n1; n += 2) {
            const uint8_t *raw = c->w + n * c->row_bytes;
            for (int64_t m0 = 0; m0 < M4; m0 += 4) {
                switch (c->t) {
                case T_Q4_0: q0_mmla16_neon(T_Q4_0, 18, raw, c->row_bytes, &c->a, K, m0, o); break;
                case T_Q5_0: q0_mmla16_neon(T_Q5_0, 22, raw, c->row_bytes, &c->a, K, m0, o); break;
                default: q0_mmla16_neon(T_Q8_0, 34, raw, c->row_bytes, &c->a, K, m0, o); break;
                }
                for (int i = 0; i < 4; i++) {  /* o: rows m0, m0+1 then m0+2, m0+3; 2 weight rows each */
                    c->y[(m0 + i) * N + n] = o[(i / 2) * 4 + (i % 2) * 2];
                    c->y[(m0 + i) * N + n + 1] = o[(i / 2) * 4 + (i % 2) * 2 + 1];
                }
            }
            for (int k = 0; k < 2 && M4 < c->M; k++) {  /* the last M % 4 rows, one weight row at a time */
                int mc = (int)(c->M - M4);
                const uint8_t *rk = raw + k * c->row_bytes;
                switch (c->t * 4 + mc) {
                case T_Q4_0 * 4 + 1: q0_rows16_neon(T_Q4_0, 18, rk, &c->a, K, M4, 1, o); break;
                case T_Q4_0 * 4 + 2: q0_rows16_neon(T_Q4_0, 18, rk, &c->a, K, M4, 2, o); break;
                case T_Q4_0 * 4 + 3: q0_rows16_neon(T_Q4_0, 18, rk, &c->a, K, M4, 3, o); break;
                case T_Q5_0 * 4 + 1: q0_rows16_neon(T_Q5_0, 22, rk, &c->a, K, M4, 1, o); break;
                case T_Q5_0 * 4 + 2: q0_rows16_neon(T_Q5_0, 22, rk, &c->a, K, M4, 2, o); break;
                case T_Q5_0 * 4 + 3: q0_rows16_neon(T_Q5_0, 22, rk, &c->a, K, M4, 3, o); break;
                case T_Q8_0 * 4 + 1: q0_rows16_neon(T_Q8_0, 34, rk, &c->a, K, M4, 1, o); break;
                case T_Q8_0 * 4 + 2: q0_rows16_neon(T_Q8_0, 34, rk, &c->a, K, M4, 2, o); break;
                default: q0_rows16_neon(T_Q8_0, 34, rk, &c->a, K, M4, 3, o); break;
                }
                for (int i = 0; i < mc; i++) c->y[(M4 + i) * N + n + k] = o[i];
            }
        }
    }
#endif
    for (; n < n1; n++) {
        const uint8_t *raw = c->w + n * c->row_bytes;
#ifdef C6_QX86
        float o[C6_X86_ROWS];
        for (int64_t m0 = 0; m0 < c->M; m0 += C6_X86_ROWS) {
            int mc = c->M - m0 < C6_X86_ROWS ? (int)(c->M - m0) : C6_X86_ROWS;
#if C6_X86_ROWS == 8
#define ROWS16(T, B)                                                                  \
            switch (mc) {                                                             \
            case 1: rows16(T, B, raw, &c->a, K, m0, 1, o); break;            \
            case 2: rows16(T, B, raw, &c->a, K, m0, 2, o); break;            \
            case 3: rows16(T, B, raw, &c->a, K, m0, 3, o); break;            \
            case 4: rows16(T, B, raw, &c->a, K, m0, 4, o); break;            \
            case 5: rows16(T, B, raw, &c->a, K, m0, 5, o); break;            \
            case 6: rows16(T, B, raw, &c->a, K, m0, 6, o); break;            \
            case 7: rows16(T, B, raw, &c->a, K, m0, 7, o); break;            \
            default: rows16(T, B, raw, &c->a, K, m0, 8, o); break;           \
            }
#else
#define ROWS16(T, B)                                                                  \
            switch (mc) {                                                             \
            case 1: rows16(T, B, raw, &c->a, K, m0, 1, o); break;            \
            case 2: rows16(T, B, raw, &c->a, K, m0, 2, o); break;            \
            case 3: rows16(T, B, raw, &c->a, K, m0, 3, o); break;            \
            default: rows16(T, B, raw, &c->a, K, m0, 4, o); break;           \
            }
#endif
#else
        float o[4];
        for (int64_t m0 = 0; m0 < c->M; m0 += 4) {
            int mc = c->M - m0 < 4 ? (int)(c->M - m0) : 4;
            /* one instantiation per (type, rows) so the block decoding has no runtime branches */
#define ROWS16(T, B)                                                                  \
            switch (mc) {                                                             \
            case 1: ROWS16_FN(T, B, raw, &c->a, K, m0, 1, o); break;         \
            case 2: ROWS16_FN(T, B, raw, &c->a, K, m0, 2, o); break;         \
            case 3: ROWS16_FN(T, B, raw, &c->a, K, m0, 3, o); break;         \
            default: ROWS16_FN(T, B, raw, &c->a, K, m0, 4, o); break;        \
            }
#endif
            switch (c->t) {
            case T_Q4_0: ROWS16(T_Q4_0, 18) break;
            case T_Q5_0: ROWS16(T_Q5_0, 22) break;
            case T_Q8_0: ROWS16(T_Q8_0, 34) break;
            case T_Q4_K: ROWS16(T_Q4_K, 144) break;
            case T_Q5_K: ROWS16(T_Q5_K, 176) break;
            default: ROWS16(T_Q6_K, 210) break;
            }
#undef ROWS16
            for (int i = 0; i < mc; i++) c->y[(m0 + i) * c->N + n] = o[i];
        }
    }
#undef ROWS16_FN
#else
    int64_t nb = K / c->qi.qk, nc = K / 32;
    qrow r;
    float *f = c6_qrow_scratch(2, K, nb, 3 * nc, &r);
    chunks cs = {f, f + nc, f + 2 * nc};
    for (int64_t n = n0; n < n1; n++) {
        c6_unpack_row(c->t, c->w + n * c->row_bytes, nb, &r);
        chunk_scales(c->t, &r, K, &cs);
        for (int64_t m = 0; m < c->M; m++) c->y[m * c->N + n] = row_dot16(r.q, &cs, &c->a, m, K);
    }
#endif
}

/* Many activation rows (prefill): a panel of weight rows is dequantized to fp32 once and fed to
 * the fp32 GEMM (exact activations; the dequantization is amortized over the M rows). */
#define PANEL 64
#define PANEL_MIN_M 16

typedef struct {
    const float *x; const uint8_t *w; int t; qinfo qi; int64_t row_bytes;
    float *y; int64_t M, N, K;
} panel_ctx;

static void panel_task(void *vctx, int64_t task) {
    const panel_ctx *c = vctx;
    int64_t n0 = task * PANEL, rows = c->N - n0 < PANEL ? c->N - n0 : PANEL, K = c->K, nb = K / c->qi.qk;
    qrow r;
    float *s = c6_qrow_scratch(3, K, nb, PANEL * K, &r);  /* the fp32 panel [PANEL, K] */
    for (int64_t i = 0; i < rows; i++) c6_dequant_row(c->t, c->w + (n0 + i) * c->row_bytes, K, &r, s + i * K);
    c6_matmul_panel(c->x, s, c->y + n0, c->M, rows, K, c->N);
}

int c6_qmatmul16(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K) {
    qinfo qi;
    if (!c6_qinfo(wtype, &qi) || K <= 0 || K % qi.qk) return -1;
    if (M <= 0 || N <= 0) return 0;
    if (M >= PANEL_MIN_M) {
        panel_ctx pc = {x, w, wtype, qi, K / qi.qk * qi.bytes, y, M, N, K};
        c6_parallel_for((N + PANEL - 1) / PANEL, panel_task, &pc);
        return 0;
    }
    size_t qbytes = ((size_t)(M * K) * sizeof(int16_t) + 63) & ~(size_t)63, extra = 0;
#ifdef C6_QX86
    int64_t K4 = (K / 32 + 3) / 4 * 128;
    extra = (size_t)(M * (K4 + 32)) * sizeof(int16_t) + (size_t)(M * K4 / 32) * 3 * sizeof(float) + 64;
#endif
#ifdef C6_I16_I8MM
    extra = 2 * (size_t)(M * K) + (size_t)(M * K / 32) * sizeof(float) + (size_t)(M * K / 16) * sizeof(int32_t) +
            (size_t)((M + 3) / 4 * 4 * (K / 32)) * sizeof(float) * 2 + (size_t)(M * K / 2) * sizeof(int32_t) +
            2 * (size_t)(M / 2 * 2 * K) + 4 * (size_t)(M / 2 * (K / 32) * 4) * sizeof(float);
#endif
    char *buf = malloc(qbytes + (size_t)(M * K / 32) * (sizeof(float) + sizeof(int32_t)) + extra);
    if (!buf) return -2;
    act16 a = {(int16_t *)buf, (float *)(buf + qbytes), NULL};
    a.asum = (int32_t *)(a.d + M * K / 32);
    for (int64_t m = 0; m < M; m++) quant_q16(x + m * K, a.q + m * K, a.d + m * (K / 32), a.asum + m * (K / 32), K);
#ifdef C6_QX86
    a.d2 = (float *)(a.asum + M * K / 32);
    a.dsx = a.d2 + M * K4 / 16;
    a.qx = (int16_t *)(((uintptr_t)(a.dsx + M * K4 / 32) + 63) & ~(uintptr_t)63);  /* 32-byte loads aligned */
    for (int64_t m = 0; m < M; m++) {
        int64_t nc = K / 32;
        for (int64_t c = 0; c < K4 / 32; c++) {
            float dc = c < nc ? a.d[m * nc + c] : 0.0f;
            a.d2[m * (K4 / 16) + 2 * c] = a.d2[m * (K4 / 16) + 2 * c + 1] = dc;
            a.dsx[m * (K4 / 32) + c] = c < nc && (wtype == T_Q4_K || wtype == T_Q5_K) ? dc * (float)a.asum[m * nc + c] : 0.0f;
            for (int j = 0; j < 8; j++)
                for (int v = 0; v < 4; v++)
                    a.qx[m * (K4 + 32) + (c / 4) * 128 + j * 16 + (c % 4) * 4 + v] = c < nc ? a.q[m * K + c * 32 + 4 * j + v] : 0;
        }
    }
#endif
#ifdef C6_I16_I8MM
    a.dasum = (float *)(a.asum + M * K / 32);
    a.a32 = (int32_t *)(a.dasum + M * K / 32);
    a.dt = (float *)(a.a32 + M * K / 16);
    a.l8t = a.dt + (M + 3) / 4 * 4 * (K / 32);
    a.h8 = (int32_t *)(a.l8t + (M + 3) / 4 * 4 * (K / 32));
    a.dp = (float *)(a.h8 + M * K / 2);
    a.l8p = a.dp + M / 2 * (K / 32) * 4;
    a.h8p = (int32_t *)(a.l8p + M / 2 * (K / 32) * 4);
    a.dsp = (float *)(a.h8p + M / 2 * (K / 32) * 4);
    a.hi = (int8_t *)(a.dsp + M / 2 * (K / 32) * 4);
    a.lo = (uint8_t *)(a.hi + M * K);
    a.hp = (int8_t *)(a.lo + M * K);
    a.lp = (uint8_t *)(a.hp + M / 2 * 2 * K);
    for (int64_t j = 0; j < M * K; j += 8) {  /* K % 32 == 0 */
        int16x8_t v = vld1q_s16(a.q + j);
        vst1_s8(a.hi + j, vshrn_n_s16(v, 8));
        vst1_u8(a.lo + j, vmovn_u16(vreinterpretq_u16_s16(v)));
    }
    if (wtype == T_Q4_K || wtype == T_Q5_K)
        for (int64_t j = 0; j < M * K / 32; j++) a.dasum[j] = a.d[j] * (float)a.asum[j];
    for (int64_t m = 0; !qi.kquant && m < (M + 3) / 4 * 4; m++)
        for (int64_t c = 0; c < K / 32; c++) {
            int64_t j = (m / 4) * (K / 32) * 4 + c * 4 + m % 4;
            int32_t sh = 0, sl = 0;
            for (int l = 0; wtype == T_Q4_0 && m < M && l < 32; l++) {
                sh += a.hi[m * K + c * 32 + l];
                sl += a.lo[m * K + c * 32 + l];
            }
            a.dt[j] = m < M ? a.d[m * (K / 32) + c] : 0.0f;
            a.l8t[j] = (float)(8 * sl);  /* exact: |8 sl| < 2^17 */
            for (int l = 0; m < M && l < 16; l++) a.h8[(m * (K / 32) + c) * 16 + l] = -2 * sh;
        }
    for (int64_t j = 0; wtype == T_Q6_K && j < M * K / 16; j++) {
        int32_t t = 0;
        for (int l = 0; l < 16; l++) t += a.q[j * 16 + l];
        a.a32[j] = 32 * t;
    }
    for (int64_t p = 0; (wtype == T_Q4_K || (!qi.kquant && M >= 4)) && p < M / 2; p++) {  /* row pairs, mmla */
        for (int64_t g = 0; g < K / 8; g++)
            for (int r = 0; r < 2; r++) {
                memcpy(a.hp + p * 2 * K + g * 16 + r * 8, a.hi + (2 * p + r) * K + g * 8, 8);
                memcpy(a.lp + p * 2 * K + g * 16 + r * 8, a.lo + (2 * p + r) * K + g * 8, 8);
            }
        for (int64_t c = 0; c < K / 32; c++)
            for (int l = 0; l < 4; l++) {
                int64_t m = 2 * p + l / 2, j = (p * (K / 32) + c) * 4 + l;
                a.dp[j] = a.d[m * (K / 32) + c];
                a.l8p[j] = wtype == T_Q4_0 ? a.l8t[(m / 4) * (K / 32) * 4 + c * 4 + m % 4] : 0.0f;
                a.h8p[j] = wtype == T_Q4_0 ? 4 * a.h8[(m * (K / 32) + c) * 16] : 0;
                a.dsp[j] = wtype == T_Q4_K ? a.dasum[m * (K / 32) + c] : 0.0f;
            }
    }
#endif
    int nt = c6_get_num_threads();
    int64_t per = (N + (int64_t)nt * 8 - 1) / ((int64_t)nt * 8);
    if (per < 16) per = 16;
#ifdef C6_I16_I8MM
    per = (per + 3) & ~(int64_t)3;  /* 4-row groups at the same n for any thread count */
#endif
    q16_ctx c = {w, wtype, qi, K / qi.qk * qi.bytes, a, y, M, N, K, per};
    c6_parallel_for((N + per - 1) / per, q16_task, &c);
    free(buf);
    return 0;
}
