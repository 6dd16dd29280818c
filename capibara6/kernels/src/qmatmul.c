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
#include "qblocks.h"

/* ---------------------------------------------------------------- activation quantization */
typedef struct {
    int8_t *q;       /* [M, K] */
    float *d;        /* [M, K/32] (Q8_0) or [M, K/256] (Q8_K) */
    int32_t *bsum;   /* Q8_K only: [M, K/16] sums of 16 consecutive q */
#if C6_USE_NEON
    float *dt;       /* Q8_0, NEON: [ceil(M/4)][K/32][4] d of 4 consecutive rows side by side */
    int8_t *qp;      /* Q8_0, i8mm, M >= 4: [M/2][K/8][2][8] q of row pairs interleaved per 8 values */
    float *dp;       /* Q8_0, i8mm, M >= 4: [M/2][K/32][4] d of row pairs as [d0, d0, d1, d1] */
#endif
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

/* Q8_0-family row: blocks of 32 int8 at w (stride ws bytes), scales wd (or fp16 in raw Q8_0) */
static float dot_q0(const int8_t *w, int64_t wstride, const float *wd, const uint8_t *raw_d,
                    const int8_t *a, const float *ad, int64_t nb) {
    float sum = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        float d = raw_d ? f16s(raw_d + b * wstride) : wd[b];
        const int8_t *wb = w + b * wstride, *xb = a + b * 32;
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += (int32_t)wb[j] * (int32_t)xb[j];
        sum += (float)s * (d * ad[b]);
    }
    return sum;
}

/* k-quant row: 256-blocks, int16 scale per 16 values, float scale per block */
static float dot_qk(const int8_t *w, const int16_t *sc, const float *wd, const int8_t *a,
                    const float *ad, int64_t nb) {
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

#ifdef C6_QX86
/* x86: up to 4 activation rows per pass over a weight row, Q4_0/Q5_0/Q8_0 blocks decoded in
 * registers (no unpack buffer). Same integer sums as above; float sums in another order. */
static inline __m256i dot32_i32(__m256i wabs, __m256i w, const int8_t *a) {
    __m256i av = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)a), w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), wabs, av);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, av), _mm256_set1_epi16(1));
#endif
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
static inline __attribute__((always_inline)) void qk_rows(int t, int bytes, const uint8_t *raw, const qact *a,
                                                          int64_t K, int64_t m0, const int MC, float *out) {
    int64_t nb = K / 256;
    int mins = t != T_Q6_K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float msum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = raw + b * bytes;
        __m256i ai[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        int32_t mi[4] = {0, 0, 0, 0};
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            int32_t s0, s1, mn;
            __m256i wv = kgroup32(t, blk, g, &s0, &s1, &mn), wa = _mm256_sign_epi8(wv, wv);
            __m256i sv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((int16_t)s0)),
                                                 _mm_set1_epi16((int16_t)s1), 1);
            for (int i = 0; i < MC; i++) {
                const int8_t *ap = a->q + (m0 + i) * K + b * 256 + g * 32;
                __m256i av = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)ap), wv);
                ai[i] = _mm256_add_epi32(ai[i], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, av), sv));
                if (mins) {
                    const int32_t *bs = a->bsum + (m0 + i) * (K / 16) + b * 16 + 2 * g;
                    mi[i] += mn * (bs[0] + bs[1]);
                }
            }
        }
        float d = f16s(blk + (t == T_Q6_K ? 208 : 0)), dmin = mins ? f16s(blk + 2) : 0.0f;
        for (int i = 0; i < MC; i++) {
            float da = a->d[(m0 + i) * nb + b];
            acc[i] = FMADD(_mm256_cvtepi32_ps(ai[i]), _mm256_set1_ps(d * da), acc[i]);
            if (mins) msum[i] += dmin * da * (float)mi[i];
        }
    }
    for (int i = 0; i < MC; i++) out[i] = hsum_ps(acc[i]) - msum[i];
}
/* y[m, n] for every m of weight row n; one instantiation per (type, rows): no runtime branches in
 * the block decoding */
static void row_all_m_x86(int t, const uint8_t *raw, const qact *a, int64_t M, int64_t N, int64_t K,
                          int64_t n, float *y) {
    float o[4];
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int mc = M - m0 < 4 ? (int)(M - m0) : 4;
#define Q0(T, B) switch (mc) {                                                   \
        case 1: q0_rows(T, B, raw, K / 32, a, K, m0, 1, o); break;              \
        case 2: q0_rows(T, B, raw, K / 32, a, K, m0, 2, o); break;              \
        case 3: q0_rows(T, B, raw, K / 32, a, K, m0, 3, o); break;              \
        default: q0_rows(T, B, raw, K / 32, a, K, m0, 4, o); break; }
#define QK(T, B) switch (mc) {                                                   \
        case 1: qk_rows(T, B, raw, a, K, m0, 1, o); break;                       \
        case 2: qk_rows(T, B, raw, a, K, m0, 2, o); break;                       \
        case 3: qk_rows(T, B, raw, a, K, m0, 3, o); break;                       \
        default: qk_rows(T, B, raw, a, K, m0, 4, o); break; }
        switch (t) {
        case T_Q4_0: Q0(T_Q4_0, 18) break;
        case T_Q5_0: Q0(T_Q5_0, 22) break;
        case T_Q8_0: Q0(T_Q8_0, 34) break;
        case T_Q4_K: QK(T_Q4_K, 144) break;
        case T_Q5_K: QK(T_Q5_K, 176) break;
        default: QK(T_Q6_K, 210) break;
        }
#undef Q0
#undef QK
        for (int i = 0; i < mc; i++) y[(m0 + i) * N + n] = o[i];
    }
}
#endif

#if C6_USE_NEON
/* NEON: up to 4 activation rows per pass over a weight row, every block type decoded in registers
 * (c6_nblock32 / c6_kgroup32), no unpack buffer. Same integer sums as row_dot; float sums in
 * another order. */
/* Every NEON 32-block path computes each (weight row, activation row) the same way, so a row's
 * result does not depend on M or on which rows share a pass: per block the exact integer sum S
 * (lanes reduced by pairwise adds), then acc = fma(acc, float(S), d * da) in block order. Up to 4
 * activation rows share one weight block here, their sums in the lanes of one vector. */
static inline __attribute__((always_inline)) void q0_rows_neon(int t, int bs, const uint8_t *raw, int64_t nb,
                                                               const qact *a, int64_t K, int64_t m0, const int MC,
                                                               float *out) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    const float *dt = a->dt + (m0 / 4) * nb * 4;  /* [nb][4]: da of rows m0..m0+3 */
    for (int64_t b = 0; b < nb; b++) {
        C6_MCA_BEGIN("i8", t, MC);
        const uint8_t *p = raw + b * bs;
        c6_i8x32 w = c6_nblock32(t, p);
        int32x4_t s[4];
        for (int i = 0; i < 4; i++) {
            const int8_t *ap = a->q + (m0 + i) * K + b * 32;
            s[i] = i < MC ? c6_dotv(c6_dotv(vdupq_n_s32(0), w.lo, vld1q_s8(ap)), w.hi, vld1q_s8(ap + 16))
                          : vdupq_n_s32(0);
        }
        int32x4_t S = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
        acc = vfmaq_f32(acc, vcvtq_f32_s32(S), vmulq_n_f32(vld1q_f32(dt + b * 4), f16s(p)));
        C6_MCA_END("i8", t, MC);
    }
    float o[4];
    vst1q_f32(o, acc);
    for (int i = 0; i < MC; i++) out[i] = o[i];
}

/* one activation row (decode), 4 weight rows per pass (rs bytes apart): the activations are
 * loaded once for the 4, the 4 block sums land in one vector (pairwise adds) and are scaled by
 * the 4 block scales as one vector */
static inline __attribute__((always_inline)) void q0_4rows_neon(int t, int bs, const uint8_t *raw, int64_t rs,
                                                                int64_t nb, const int8_t *aq, const float *ad,
                                                                const int32_t *a8, float *out) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++) {
        C6_MCA_BEGIN("i8n4", t, 1);
        const uint8_t *p = raw + b * bs;
        int8x16_t a0 = vld1q_s8(aq + b * 32), a1 = vld1q_s8(aq + b * 32 + 16);
        /* Q4_0: the nibbles as they are, the sums start at -8 sum(a) (-2 sum(a) in each lane) */
        int32x4_t z = t == T_Q4_0 ? vld1q_dup_s32(a8 + b) : vdupq_n_s32(0), s[4];
        for (int r = 0; r < 4; r++) {
            c6_i8x32 w = t == T_Q4_0 ? c6_nib32(vld1q_u8(p + r * rs + 2)) : c6_nblock32(t, p + r * rs);
            s[r] = c6_dotv(c6_dotv(z, w.lo, a0), w.hi, a1);
        }
        int32x4_t S = vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
        acc = vfmaq_f32(acc, vcvtq_f32_s32(S), vmulq_n_f32(c6_f16x4(p, rs), ad[b]));
        C6_MCA_END("i8n4", t, 1);
    }
    vst1q_f32(out, acc);
}

#if defined(__ARM_FEATURE_MATMUL_INT8)
#define C6_I8_MMLA 1
/* i8mm, M >= 4: 2 weight rows x 4 activation rows per pass with smmla (a 2x8 by 8x2 int8 product
 * per instruction, every lane useful, where sdot wastes nothing but needs twice the instructions):
 * activation rows interleaved in pairs per 8 values (a->qp), the two weight rows' decoded blocks
 * zipped per 8 values. Lanes (act i, weight j) = [00, 01, 10, 11]; per element the same exact
 * block sum and fma(acc, float(S), d * da) as q0_rows_neon, so results do not depend on M. */
static inline __attribute__((always_inline)) void q0_mmla_neon(int t, int bs, const uint8_t *raw, int64_t rs,
                                                               const qact *a, int64_t K, int64_t m0, float *o8) {
    int64_t nb = K / 32;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    const int8_t *a0 = a->qp + (m0 / 2) * 2 * K, *a1 = a0 + 2 * K;
    const float *d0 = a->dp + (m0 / 2) * nb * 4, *d1 = d0 + nb * 4;
    for (int64_t b = 0; b < nb; b++) {
        C6_MCA_BEGIN("i8n2", t, 4);
        const uint8_t *p = raw + b * bs;
        c6_i8x32 u = c6_nblock32(t, p), v = c6_nblock32(t, p + rs);
        int64x2_t ul = vreinterpretq_s64_s8(u.lo), vl = vreinterpretq_s64_s8(v.lo);
        int64x2_t uh = vreinterpretq_s64_s8(u.hi), vh = vreinterpretq_s64_s8(v.hi);
        int8x16_t B0 = vreinterpretq_s8_s64(vzip1q_s64(ul, vl)), B1 = vreinterpretq_s8_s64(vzip2q_s64(ul, vl));
        int8x16_t B2 = vreinterpretq_s8_s64(vzip1q_s64(uh, vh)), B3 = vreinterpretq_s8_s64(vzip2q_s64(uh, vh));
        const int8_t *x0 = a0 + b * 64, *x1 = a1 + b * 64;
        int32x4_t s0 = vmmlaq_s32(vmmlaq_s32(vdupq_n_s32(0), vld1q_s8(x0), B0), vld1q_s8(x0 + 16), B1);
        int32x4_t s1 = vmmlaq_s32(vmmlaq_s32(vdupq_n_s32(0), vld1q_s8(x1), B0), vld1q_s8(x1 + 16), B1);
        s0 = vmmlaq_s32(vmmlaq_s32(s0, vld1q_s8(x0 + 32), B2), vld1q_s8(x0 + 48), B3);
        s1 = vmmlaq_s32(vmmlaq_s32(s1, vld1q_s8(x1 + 32), B2), vld1q_s8(x1 + 48), B3);
        uint64_t h2 = (uint64_t)rd16(p) | (uint64_t)rd16(p + rs) << 16;  /* d of weight rows [0, 1, 0, 1] */
        float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u64(vcreate_u64(h2 | h2 << 32)));
        acc0 = vfmaq_f32(acc0, vcvtq_f32_s32(s0), vmulq_f32(vld1q_f32(d0 + b * 4), dw));
        acc1 = vfmaq_f32(acc1, vcvtq_f32_s32(s1), vmulq_f32(vld1q_f32(d1 + b * 4), dw));
        C6_MCA_END("i8n2", t, 4);
    }
    vst1q_f32(o8, acc0);
    vst1q_f32(o8 + 4, acc1);
}
#endif

/* k-quants: per 256-block and row, the 4-lane dot of each 32 (Q6_K: 16) values, reduced by
 * pairwise adds to one lane per scale, times the scales as vectors; the mins (Q4_K/Q5_K) the same
 * way against the activations' 16-value sums. */
static inline __attribute__((always_inline)) void qk_rows_neon(int t, int bytes, const uint8_t *raw, const qact *a,
                                                               int64_t K, int64_t m0, const int MC, float *out) {
    int64_t nb = K / 256;
    const int mins = t != T_Q6_K;
    float32x4_t acc[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int64_t b = 0; b < nb; b++) {
        C6_MCA_BEGIN("i8", t, MC);
        const uint8_t *blk = raw + b * bytes;
        int32x4_t sc[4], mn[2];
        if (mins) {
            uint8x16_t sm = c6_kscales(blk + 4);
            uint16x8_t s16 = vmovl_u8(vget_low_u8(sm)), m16 = vmovl_u8(vget_high_u8(sm));
            sc[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(s16)));
            sc[1] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(s16)));
            mn[0] = vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(m16)));
            mn[1] = vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(m16)));
        } else {
            int8x16_t s8 = vld1q_s8((const int8_t *)blk + 192);
            int16x8_t l = vmovl_s8(vget_low_s8(s8)), h = vmovl_s8(vget_high_s8(s8));
            sc[0] = vmovl_s16(vget_low_s16(l));
            sc[1] = vmovl_s16(vget_high_s16(l));
            sc[2] = vmovl_s16(vget_low_s16(h));
            sc[3] = vmovl_s16(vget_high_s16(h));
        }
        int32x4_t isum[4], part[4][4];
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            c6_i8x32 w = c6_kgroup32(t, blk, g);
            for (int i = 0; i < MC; i++) {
                const int8_t *ap = a->q + (m0 + i) * K + b * 256 + g * 32;
                int32x4_t p;
                if (mins) {  /* one scale per 32: one lane per group after two pairwise adds */
                    p = c6_dotv(c6_dotv(vdupq_n_s32(0), w.lo, vld1q_s8(ap)), w.hi, vld1q_s8(ap + 16));
                    if (g & 1) part[i][g / 2] = vpaddq_s32(part[i][g / 2], p);
                    else part[i][g / 2] = p;
                } else {     /* one scale per 16: lanes 2k, 2k+1 of a pairwise add hold 16-sums */
                    int32x4_t p0 = c6_dotv(vdupq_n_s32(0), w.lo, vld1q_s8(ap));
                    int32x4_t p1 = c6_dotv(vdupq_n_s32(0), w.hi, vld1q_s8(ap + 16));
                    p = vpaddq_s32(p0, p1);
                    if (g & 1) part[i][g / 2] = vpaddq_s32(part[i][g / 2], p);
                    else part[i][g / 2] = p;
                }
            }
        }
        float d = f16s(blk + (mins ? 0 : 208)), dmin = mins ? f16s(blk + 2) : 0.0f;
        for (int i = 0; i < MC; i++) {
            int64_t m = m0 + i;
            float da = a->d[m * nb + b];
            if (mins) {
                isum[i] = vmulq_s32(vpaddq_s32(part[i][0], part[i][1]), sc[0]);
                isum[i] = vmlaq_s32(isum[i], vpaddq_s32(part[i][2], part[i][3]), sc[1]);
                const int32_t *bs = a->bsum + m * (K / 16) + b * 16;
                int32x4_t mi = vmulq_s32(vpaddq_s32(vld1q_s32(bs), vld1q_s32(bs + 4)), mn[0]);
                mi = vmlaq_s32(mi, vpaddq_s32(vld1q_s32(bs + 8), vld1q_s32(bs + 12)), mn[1]);
                acc[i] = vfmaq_n_f32(acc[i], vcvtq_f32_s32(isum[i]), d * da);
                acc[i] = vfmsq_f32(acc[i], vcvtq_f32_s32(mi), vdupq_n_f32(dmin * da));
            } else {     /* Q6_K: sum((q - 32) a) = sum(q a) - 32 sum(a), per 16 values */
                const int32_t *bs = a->bsum + m * (K / 16) + b * 16;
                isum[i] = vmulq_s32(vmlsq_n_s32(part[i][0], vld1q_s32(bs), 32), sc[0]);
                isum[i] = vmlaq_s32(isum[i], vmlsq_n_s32(part[i][1], vld1q_s32(bs + 4), 32), sc[1]);
                isum[i] = vmlaq_s32(isum[i], vmlsq_n_s32(part[i][2], vld1q_s32(bs + 8), 32), sc[2]);
                isum[i] = vmlaq_s32(isum[i], vmlsq_n_s32(part[i][3], vld1q_s32(bs + 12), 32), sc[3]);
                acc[i] = vfmaq_n_f32(acc[i], vcvtq_f32_s32(isum[i]), d * da);
            }
        }
        C6_MCA_END("i8", t, MC);
    }
    for (int i = 0; i < MC; i++) out[i] = vaddvq_f32(acc[i]);
}

/* y[m, n] for every m of weight row n; one instantiation per (type, rows) */
static void row_all_m_neon(int t, const uint8_t *raw, const qact *a, int64_t M, int64_t N, int64_t K,
                           int64_t n, int64_t m_start, float *y) {
    float o[4];
    for (int64_t m0 = m_start; m0 < M; m0 += 4) {
        int mc = M - m0 < 4 ? (int)(M - m0) : 4;
#define Q0(T, B) switch (mc) {                                                   \
        case 1: q0_rows_neon(T, B, raw, K / 32, a, K, m0, 1, o); break;         \
        case 2: q0_rows_neon(T, B, raw, K / 32, a, K, m0, 2, o); break;         \
        case 3: q0_rows_neon(T, B, raw, K / 32, a, K, m0, 3, o); break;         \
        default: q0_rows_neon(T, B, raw, K / 32, a, K, m0, 4, o); break; }
#define QK(T, B) switch (mc) {                                                   \
        case 1: qk_rows_neon(T, B, raw, a, K, m0, 1, o); break;                  \
        case 2: qk_rows_neon(T, B, raw, a, K, m0, 2, o); break;                  \
        case 3: qk_rows_neon(T, B, raw, a, K, m0, 3, o); break;                  \
        default: qk_rows_neon(T, B, raw, a, K, m0, 4, o); break; }
        switch (t) {
        case T_Q4_0: Q0(T_Q4_0, 18) break;
        case T_Q5_0: Q0(T_Q5_0, 22) break;
        case T_Q8_0: Q0(T_Q8_0, 34) break;
        case T_Q4_K: QK(T_Q4_K, 144) break;
        case T_Q5_K: QK(T_Q5_K, 176) break;
        default: QK(T_Q6_K, 210) break;
        }
#undef Q0
#undef QK
        for (int i = 0; i < mc; i++) y[(m0 + i) * N + n] = o[i];
    }
}
#endif

typedef struct {
    const uint8_t *w; int t; qinfo qi; int64_t row_bytes;
    qact a; float *y; int64_t M, N, K, per;
} qmm_ctx;

#if C6_USE_NEON
/* M = 1, 32-block types: rows n0.. in groups of 4 (n0 % 4 == 0: see per); returns the first row
 * left (a separate function: its code does not shift with the other paths) */
static __attribute__((noinline)) int64_t decode_4rows_neon(const qmm_ctx *c, int64_t n0, int64_t n1) {
    int64_t n = n0, K = c->K;
    float o[4];
    for (; n + 4 <= n1; n += 4) {
        const uint8_t *raw = c->w + n * c->row_bytes;
        switch (c->t) {
        case T_Q4_0: q0_4rows_neon(T_Q4_0, 18, raw, c->row_bytes, K / 32, c->a.q, c->a.d, c->a.bsum, o); break;
        case T_Q5_0: q0_4rows_neon(T_Q5_0, 22, raw, c->row_bytes, K / 32, c->a.q, c->a.d, c->a.bsum, o); break;
        default: q0_4rows_neon(T_Q8_0, 34, raw, c->row_bytes, K / 32, c->a.q, c->a.d, c->a.bsum, o); break;
        }
        memcpy(c->y + n, o, sizeof o);
    }
    return n;
}
#endif

static void qmm_task(void *vctx, int64_t task) {
    const qmm_ctx *c = vctx;
    int64_t n0 = task * c->per, n1 = n0 + c->per < c->N ? n0 + c->per : c->N, K = c->K;
#ifdef C6_QX86
    for (int64_t n = n0; n < n1; n++) row_all_m_x86(c->t, c->w + n * c->row_bytes, &c->a, c->M, c->N, K, n, c->y);
#elif C6_USE_NEON
    int64_t n = n0;
    if (c->M == 1 && !c->qi.kquant) n = decode_4rows_neon(c, n0, n1);
#if defined(C6_I8_MMLA)
    if (c->M >= 4 && !c->qi.kquant) {  /* 2 weight rows x 4 activation rows per pass (n0 % 4 == 0) */
        int64_t M4 = c->M / 4 * 4, N = c->N;
        float o[8];
        for (; n + 2 <= n1; n += 2) {
            const uint8_t *raw = c->w + n * c->row_bytes;
            for (int64_t m0 = 0; m0 < M4; m0 += 4) {
                switch (c->t) {
                case T_Q4_0: q0_mmla_neon(T_Q4_0, 18, raw, c->row_bytes, &c->a, K, m0, o); break;
                case T_Q5_0: q0_mmla_neon(T_Q5_0, 22, raw, c->row_bytes, &c->a, K, m0, o); break;
                default: q0_mmla_neon(T_Q8_0, 34, raw, c->row_bytes, &c->a, K, m0, o); break;
                }
                for (int i = 0; i < 4; i++) {  /* o: rows m0, m0+1 then m0+2, m0+3; 2 weight rows each */
                    c->y[(m0 + i) * N + n] = o[(i / 2) * 4 + (i % 2) * 2];
                    c->y[(m0 + i) * N + n + 1] = o[(i / 2) * 4 + (i % 2) * 2 + 1];
                }
            }
            row_all_m_neon(c->t, raw, &c->a, c->M, N, K, n, M4, c->y);
            row_all_m_neon(c->t, raw + c->row_bytes, &c->a, c->M, N, K, n + 1, M4, c->y);
        }
    }
#endif
    for (; n < n1; n++) row_all_m_neon(c->t, c->w + n * c->row_bytes, &c->a, c->M, c->N, K, n, 0, c->y);
#else
    int64_t nb = K / c->qi.qk;
    qrow r = {0};
    if (c->t != T_Q8_0) c6_qrow_scratch(2, K, nb, 0, &r);  /* Q8_0 rows are read in place */
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *raw = c->w + n * c->row_bytes;
        if (c->t != T_Q8_0) c6_unpack_row(c->t, raw, nb, &r);
        for (int64_t m = 0; m < c->M; m++) c->y[m * c->N + n] = row_dot(c->t, &c->qi, raw, &r, &c->a, m, K);
    }
#endif
}

int c6_qmatmul(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K) {
    qinfo qi;
    if (!c6_qinfo(wtype, &qi) || K <= 0 || K % qi.qk) return -1;
    if (M <= 0 || N <= 0) return 0;
    int64_t ab = qi.kquant ? 256 : 32;
    /* activations: q [M*K] int8 | d [M*K/ab] | bsum [M*K/16] (one malloc: M can be large) */
    size_t qbytes = ((size_t)(M * K) + 63) & ~(size_t)63;
    size_t extra = 0;
#if C6_USE_NEON
    extra = (size_t)((M + 3) / 4 * 4 * (K / 32)) * sizeof(float);
    extra += (size_t)(M / 2 * 2 * K) + (size_t)(M / 2 * (K / 32) * 4) * sizeof(float) + 64;
#endif
    char *buf = malloc(qbytes + (size_t)(M * K / ab) * sizeof(float) + (size_t)(M * K / 16) * sizeof(int32_t) + extra);
    if (!buf) return -2;
    qact a = {(int8_t *)buf, (float *)(buf + qbytes), NULL};
    a.bsum = (int32_t *)(a.d + M * K / ab);
    for (int64_t m = 0; m < M; m++) {
        if (qi.kquant) quant_q8_K(x + m * K, a.q + m * K, a.d + m * (K / 256), a.bsum + m * (K / 16), K);
        else quant_q8_0(x + m * K, a.q + m * K, a.d + m * (K / 32), K);
    }
#if C6_USE_NEON
    a.dt = (float *)(a.bsum + M * K / 16);
    a.dp = a.dt + (M + 3) / 4 * 4 * (K / 32);
    a.qp = (int8_t *)(a.dp + M / 2 * (K / 32) * 4);
#if defined(C6_I8_MMLA)
    if (!qi.kquant && M >= 4)
        for (int64_t p = 0; p < M / 2; p++) {
            for (int64_t g = 0; g < K / 8; g++)
                for (int r = 0; r < 2; r++) memcpy(a.qp + p * 2 * K + g * 16 + r * 8, a.q + (2 * p + r) * K + g * 8, 8);
            for (int64_t b = 0; b < K / 32; b++)
                for (int l = 0; l < 4; l++) a.dp[(p * (K / 32) + b) * 4 + l] = a.d[(2 * p + l / 2) * (K / 32) + b];
        }
#endif
    if (!qi.kquant)
        for (int64_t m = 0; m < (M + 3) / 4 * 4; m++)
            for (int64_t b = 0; b < K / 32; b++)
                a.dt[(m / 4) * (K / 32) * 4 + b * 4 + m % 4] = m < M ? a.d[m * (K / 32) + b] : 0.0f;
    if (wtype == T_Q4_0 && M == 1)  /* bsum[b] = -2 sum(q) of block b: q0_4rows_neon's start */
        for (int64_t b = 0; b < K / 32; b++) {
            int32_t t = 0;
            for (int j = 0; j < 32; j++) t += a.q[b * 32 + j];
            a.bsum[b] = -2 * t;
        }
#endif
    int nt = c6_get_num_threads();
    int64_t per = (N + (int64_t)nt * 8 - 1) / ((int64_t)nt * 8);
    if (per < 16) per = 16;
#if C6_USE_NEON
    per = (per + 3) & ~(int64_t)3;  /* 4-row groups at the same n for any thread count */
#endif
    qmm_ctx c = {w, wtype, qi, K / qi.qk * qi.bytes, a, y, M, N, K, per};
    c6_parallel_for((N + per - 1) / per, qmm_task, &c);
    free(buf);
    return 0;
}

