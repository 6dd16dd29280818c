/* FP8 E4M3 (OCP e4m3fn: bias 7, no inf, NaN = S.1111.111, max 448) encode/decode, row scales.
 * Encode: v = x / scale (float32 division), clip to [-448, 448] (inf -> +-448), round to nearest even,
 * NaN -> sign|0x7F. Bit-identical to ml_dtypes.float8_e4m3fn(np.clip(x / scale, -448, 448)). */
#include "capibara6_kernels.h"
#include <math.h>

float c6_fp8_table[256];

__attribute__((constructor)) void c6_fp8_init(void) {
    for (int c = 0; c < 256; c++) {
        int e = (c >> 3) & 15, m = c & 7;
        float v;
        if (e == 15 && m == 7) v = NAN;
        else if (e == 0) v = ldexpf((float)m, -9);
        else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
        c6_fp8_table[c] = (c & 0x80) ? -v : v;
    }
}

/* one value, branch-free (vectorisable); v already divided by the scale */
static inline uint8_t e4m3(float v) {
    uint32_t u = c6_f2u(v);
    uint32_t sign = (u >> 24) & 0x80u, a = u & 0x7FFFFFFFu;
    float f = c6_u2f(a);
    f = f < 448.0f ? f : 448.0f;                   /* NaN handled below */
    uint32_t b = c6_f2u(f);
    uint32_t rn = ((b + 0x7FFFFu + ((b >> 20) & 1u)) >> 20) - 960u;   /* normal: RNE to 3 mantissa bits */
    uint32_t rs = (uint32_t)(int32_t)((f * 512.0f + 8388608.0f) - 8388608.0f); /* subnormal: RNE(f*2^9) */
    uint32_t code = b >= 0x3C800000u ? rn : rs;    /* 2^-6 = smallest normal */
    code = a > 0x7F800000u ? 0x7Fu : code;
    return (uint8_t)(sign | code);
}

#if C6_USE_NEON
static inline uint32x4_t ve4m3(float32x4_t v) {
    uint32x4_t u = vreinterpretq_u32_f32(v);
    uint32x4_t sign = vandq_u32(vshrq_n_u32(u, 24), vdupq_n_u32(0x80));
    uint32x4_t a = vandq_u32(u, vdupq_n_u32(0x7FFFFFFF));
    float32x4_t f = vminnmq_f32(vreinterpretq_f32_u32(a), vdupq_n_f32(448.0f)); /* NaN -> 448, fixed below */
    uint32x4_t b = vreinterpretq_u32_f32(f);
    uint32x4_t rn = vsubq_u32(vshrq_n_u32(vaddq_u32(vaddq_u32(b, vdupq_n_u32(0x7FFFF)),
                                                     vandq_u32(vshrq_n_u32(b, 20), vdupq_n_u32(1))), 20),
                              vdupq_n_u32(960));
    uint32x4_t rs = vcvtq_u32_f32(vrndnq_f32(vmulq_n_f32(f, 512.0f)));
    uint32x4_t code = vbslq_u32(vcgeq_u32(b, vdupq_n_u32(0x3C800000)), rn, rs);
    code = vbslq_u32(vcgtq_u32(a, vdupq_n_u32(0x7F800000)), vdupq_n_u32(0x7F), code);
    return vorrq_u32(sign, code);
}
static inline uint8x16_t ve4m3_16(const float *x, float32x4_t s) {
    uint32x4_t c0 = ve4m3(vdivq_f32(vld1q_f32(x), s)), c1 = ve4m3(vdivq_f32(vld1q_f32(x + 4), s));
    uint32x4_t c2 = ve4m3(vdivq_f32(vld1q_f32(x + 8), s)), c3 = ve4m3(vdivq_f32(vld1q_f32(x + 12), s));
    uint16x8_t h0 = vcombine_u16(vmovn_u32(c0), vmovn_u32(c1)), h1 = vcombine_u16(vmovn_u32(c2), vmovn_u32(c3));
    return vcombine_u8(vmovn_u16(h0), vmovn_u16(h1));
}
/* decode 4 codes (in the low bytes of u32 lanes) to float, unscaled */
static inline float32x4_t vdec4(uint32x4_t c) {
    uint32x4_t sign = vshlq_n_u32(vandq_u32(c, vdupq_n_u32(0x80)), 24);
    uint32x4_t mag = vandq_u32(c, vdupq_n_u32(0x7F));
    uint32x4_t nbits = vaddq_u32(vshlq_n_u32(mag, 20), vdupq_n_u32(0x3C000000));   /* exp + 120 */
    float32x4_t sub = vmulq_n_f32(vcvtq_f32_u32(mag), 1.0f / 512.0f);              /* e == 0 */
    uint32x4_t v = vbslq_u32(vcltq_u32(mag, vdupq_n_u32(8)), vreinterpretq_u32_f32(sub), nbits);
    v = vbslq_u32(vceqq_u32(mag, vdupq_n_u32(0x7F)), vdupq_n_u32(0x7FC00000), v);
    return vreinterpretq_f32_u32(vorrq_u32(v, sign));
}
#endif

/* one code -> float, branch-free bit manipulation (vectorisable; same values as c6_fp8_table) */
static inline float dec1(uint8_t c) {
    uint32_t mag = c & 0x7Fu, sign = (uint32_t)(c & 0x80u) << 24;
    uint32_t nb = (mag << 20) + 0x3C000000u;                       /* exponent + 120 */
    uint32_t sb = c6_f2u((float)(int32_t)mag * (1.0f / 512.0f));   /* subnormal: m * 2^-9 */
    uint32_t sub = 0u - (uint32_t)(mag < 8u), nan = 0u - (uint32_t)(mag == 0x7Fu);
    uint32_t v = (sb & sub) | (nb & ~sub);
    v = (0x7FC00000u & nan) | (v & ~nan);
    return c6_u2f(v | sign);
}

/* out[D] = decode(q[D]) * s  (shared with attention) */
void c6_fp8_decode_row(const uint8_t *restrict q, float s, float *restrict out, int64_t D) {
    int64_t i = 0;
#if C6_USE_NEON
    for (; i + 16 <= D; i += 16) {
        uint8x16_t b = vld1q_u8(q + i);
        uint16x8_t lo = vmovl_u8(vget_low_u8(b)), hi = vmovl_u8(vget_high_u8(b));
        vst1q_f32(out + i, vmulq_n_f32(vdec4(vmovl_u16(vget_low_u16(lo))), s));
        vst1q_f32(out + i + 4, vmulq_n_f32(vdec4(vmovl_u16(vget_high_u16(lo))), s));
        vst1q_f32(out + i + 8, vmulq_n_f32(vdec4(vmovl_u16(vget_low_u16(hi))), s));
        vst1q_f32(out + i + 12, vmulq_n_f32(vdec4(vmovl_u16(vget_high_u16(hi))), s));
    }
#endif
    for (; i < D; i++) out[i] = dec1(q[i]) * s;
}

static void encode_row(const float *restrict x, float s, uint8_t *restrict q, int64_t D) {
    int64_t i = 0;
#if C6_USE_NEON
    float32x4_t sv = vdupq_n_f32(s);
    for (; i + 16 <= D; i += 16) vst1q_u8(q + i, ve4m3_16(x + i, sv));
#endif
    for (; i < D; i++) q[i] = e4m3(x[i] / s);
}

void c6_fp8_encode(const float *x, const float *scale, int64_t scale_stride, uint8_t *q, int64_t R, int64_t D) {
    for (int64_t r = 0; r < R; r++) encode_row(x + r * D, scale[r * scale_stride], q + r * D, D);
}

void c6_fp8_decode(const uint8_t *q, const float *scale, int64_t scale_stride, float *y, int64_t R, int64_t D) {
    for (int64_t r = 0; r < R; r++) c6_fp8_decode_row(q + r * D, scale[r * scale_stride], y + r * D, D);
}

/* scale[r] = max|x[r]| / 448 (NaN ignored; 1.0 for an all-zero row); q = encode(x, scale) */
void c6_fp8_quantize_rows(const float *x, uint8_t *q, float *scale, int64_t R, int64_t D) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D;
        float amax = 0.0f;
        int64_t i = 0;
#if C6_USE_NEON
        float32x4_t m0 = vdupq_n_f32(0), m1 = m0;
        for (; i + 8 <= D; i += 8) {
            m0 = vmaxnmq_f32(m0, vabsq_f32(vld1q_f32(xr + i)));
            m1 = vmaxnmq_f32(m1, vabsq_f32(vld1q_f32(xr + i + 4)));
        }
        amax = vmaxnmvq_f32(vmaxnmq_f32(m0, m1));
#else
        c6_vf m0 = {0}, m1 = {0};
        const c6_vi absmask = (c6_vi){0} + 0x7FFFFFFF;
        for (; i + 2 * C6_VL <= D; i += 2 * C6_VL) {
            m0 = c6_vmax((c6_vf)((c6_vi)c6_ldu(xr + i) & absmask), m0);
            m1 = c6_vmax((c6_vf)((c6_vi)c6_ldu(xr + i + C6_VL) & absmask), m1);
        }
        amax = c6_hmax(c6_vmax(m0, m1));
#endif
        for (; i < D; i++) { float a = fabsf(xr[i]); amax = a > amax ? a : amax; }
        float s = amax > 0.0f ? amax / 448.0f : 1.0f;
        scale[r] = s;
        encode_row(xr, s, q + r * D, D);
    }
}
