/* Row/elementwise ops: softmax, rmsnorm, swiglu, geglu, gelu(tanh), exp, rope.
 * In-place (y == x) is allowed for all of them, so no restrict on x/y. */
#include "capibara6_kernels.h"
#include <math.h>
#include <stdlib.h>

#define CHUNK 512  /* reductions: float partial sums over CHUNK elements, then double */

static inline float silu_mul(float g, float u) { return g / (1.0f + c6_expf(-g)) * u; }
/* gelu_tanh(x) = 0.5x(1+tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi)(x + 0.044715 x^3): no cancellation */
static inline float gelu1(float x) {
    float z2 = (x + 0.044715f * x * x * x) * 1.5957691216057308f;   /* 2*sqrt(2/pi) */
    return x / (1.0f + c6_expf(-z2));
}
/* exp(x - m) where x - m is computed exactly as d + err (TwoSum), guarded for -inf */
static inline float exp_diff(float x, float m) {
    float d = x - m;
    float bv = d - x;
    float err = (x - (d - bv)) + (-m - bv);
    err = d > -104.0f ? err : 0.0f;
    return c6_expf2(d, err);
}

#if !C6_USE_NEON
/* exp(d + err) for d <= 0 (softmax): one 2^n scale instead of two; results below FLT_MIN
 * (d < -87.3365) flush to 0; NaN propagates. Same reduction/polynomial as c6_vexp2 (c6_vexp_core). */
static inline c6_vf vexp_le0(c6_vf d, c6_vf err) {
    c6_vi under = d < c6_splat(-87.33654f);
    c6_vf x = (c6_vf)(((c6_vi)c6_splat(-87.0f) & under) | ((c6_vi)d & ~under));
    c6_vi ni;
    c6_vf y = c6_vexp_core(x, err, &ni) * (c6_vf)((ni + 127) << 23);
    return (c6_vf)((c6_vi)y & ~under);
}
#endif

/* softmax: x,y [R,C], over the last axis */
void c6_softmax(const float *x, float *y, int64_t R, int64_t C) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * C;
        float *yr = y + r * C;
        int64_t i = 0;
        float m = -INFINITY;
#if C6_USE_NEON
        float32x4_t m0 = vdupq_n_f32(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        for (; i + 16 <= C; i += 16) {
            m0 = vmaxq_f32(m0, vld1q_f32(xr + i)); m1 = vmaxq_f32(m1, vld1q_f32(xr + i + 4));
            m2 = vmaxq_f32(m2, vld1q_f32(xr + i + 8)); m3 = vmaxq_f32(m3, vld1q_f32(xr + i + 12));
        }
        m = vmaxvq_f32(vmaxq_f32(vmaxq_f32(m0, m1), vmaxq_f32(m2, m3)));
#else
        c6_vf m0 = (c6_vf){0} - INFINITY, m1 = m0;
        for (; i + 2 * C6_VL <= C; i += 2 * C6_VL) {
            m0 = c6_vmax(c6_ldu(xr + i), m0);
            m1 = c6_vmax(c6_ldu(xr + i + C6_VL), m1);
        }
        m = c6_hmax(c6_vmax(m0, m1));
#endif
        for (; i < C; i++) m = xr[i] > m ? xr[i] : m;
        double total = 0.0;
        for (int64_t c0 = 0; c0 < C; c0 += CHUNK) {
            int64_t n = C - c0 < CHUNK ? C - c0 : CHUNK;
            const float *xc = xr + c0;
            float *yc = yr + c0;
            int64_t k = 0;
            float part = 0.0f;
#if C6_USE_NEON
            float32x4_t vm = vdupq_n_f32(m), s0 = vdupq_n_f32(0), s1 = s0;
            for (; k + 8 <= n; k += 8) {
                for (int h = 0; h < 2; h++) {
                    float32x4_t xv = vld1q_f32(xc + k + 4 * h);
                    float32x4_t d = vsubq_f32(xv, vm);
                    float32x4_t bv = vsubq_f32(d, xv);
                    float32x4_t err = vaddq_f32(vsubq_f32(xv, vsubq_f32(d, bv)), vsubq_f32(vnegq_f32(vm), bv));
                    err = vbslq_f32(vcgtq_f32(d, vdupq_n_f32(-104.0f)), err, vdupq_n_f32(0));
                    float32x4_t e = c6_vexpq2(d, err);
                    vst1q_f32(yc + k + 4 * h, e);
                    if (h) s1 = vaddq_f32(s1, e); else s0 = vaddq_f32(s0, e);
                }
            }
            part = vaddvq_f32(vaddq_f32(s0, s1));
            for (; k < n; k++) { yc[k] = exp_diff(xc[k], m); part += yc[k]; }
#else
            c6_vf vm = c6_splat(m), s0 = {0}, s1 = {0};
            for (; k + 2 * C6_VL <= n; k += 2 * C6_VL) {
                for (int h = 0; h < 2; h++) {
                    c6_vf xv = c6_ldu(xc + k + h * C6_VL);
                    c6_vf d = xv - vm;
                    c6_vf bv = d - xv;
                    c6_vf err = (xv - (d - bv)) + (-vm - bv);
                    err = (c6_vf)((c6_vi)err & (d > c6_splat(-104.0f)));
                    c6_vf e = vexp_le0(d, err);
                    *(c6_vfu *)(yc + k + h * C6_VL) = e;
                    if (h) s1 += e; else s0 += e;
                }
            }
            part = c6_hsum(s0 + s1);
            for (; k < n; k++) { yc[k] = exp_diff(xc[k], m); part += yc[k]; }
#endif
            total += part;
        }
        float inv = (float)(1.0 / total);
        for (int64_t j = 0; j < C; j++) yr[j] *= inv;
    }
}

/* rmsnorm: x,y [R,D], w [D] */
void c6_rmsnorm(const float *x, const float *w, float *y, int64_t R, int64_t D, float eps) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        double ss = 0.0;
        for (int64_t c0 = 0; c0 < D; c0 += CHUNK) {
            int64_t n = D - c0 < CHUNK ? D - c0 : CHUNK;
            const float *xc = xr + c0;
            int64_t k = 0;
            float part;
#if C6_USE_NEON
            float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
            for (; k + 16 <= n; k += 16) {
                float32x4_t v0 = vld1q_f32(xc + k), v1 = vld1q_f32(xc + k + 4);
                float32x4_t v2 = vld1q_f32(xc + k + 8), v3 = vld1q_f32(xc + k + 12);
                a0 = vfmaq_f32(a0, v0, v0); a1 = vfmaq_f32(a1, v1, v1);
                a2 = vfmaq_f32(a2, v2, v2); a3 = vfmaq_f32(a3, v3, v3);
            }
            part = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
#else
            c6_vf a0 = {0}, a1 = {0};
            for (; k + 2 * C6_VL <= n; k += 2 * C6_VL) {
                c6_vf v0 = c6_ldu(xc + k), v1 = c6_ldu(xc + k + C6_VL);
                a0 += v0 * v0; a1 += v1 * v1;
            }
            part = c6_hsum(a0 + a1);
#endif
            for (; k < n; k++) part += xc[k] * xc[k];
            ss += part;
        }
        float sc = (float)(1.0 / sqrt(ss / (double)D + (double)eps));
        int64_t k = 0;
#if C6_USE_NEON
        for (; k + 4 <= D; k += 4)
            vst1q_f32(yr + k, vmulq_f32(vmulq_n_f32(vld1q_f32(xr + k), sc), vld1q_f32(w + k)));
#endif
        for (; k < D; k++) yr[k] = xr[k] * sc * w[k];
    }
}

/* swiglu/geglu/gelu/exp: flat n elements */
void c6_swiglu(const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
#if C6_USE_NEON
    for (; i + 4 <= n; i += 4) {
        float32x4_t gv = vld1q_f32(g + i);
        float32x4_t e = c6_vexpq(vnegq_f32(gv));
        vst1q_f32(y + i, vmulq_f32(vdivq_f32(gv, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(u + i)));
    }
#else
    for (; i + C6_VL <= n; i += C6_VL) {
        c6_vf gv = c6_ldu(g + i);
        *(c6_vfu *)(y + i) = gv / (1.0f + c6_vexp2(-gv, (c6_vf){0})) * c6_ldu(u + i);
    }
#endif
    for (; i < n; i++) y[i] = silu_mul(g[i], u[i]);
}

#if !C6_USE_NEON
static inline c6_vf vgelu(c6_vf x) {
    c6_vf z2 = (x + 0.044715f * x * x * x) * 1.5957691216057308f;
    return x / (1.0f + c6_vexp2(-z2, (c6_vf){0}));
}
#endif
#if C6_USE_NEON
static inline float32x4_t vgelu(float32x4_t x) {
    float32x4_t x3 = vmulq_f32(vmulq_f32(x, x), x);
    float32x4_t z2 = vmulq_n_f32(vfmaq_n_f32(x, x3, 0.044715f), 1.5957691216057308f);
    return vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.0f), c6_vexpq(vnegq_f32(z2))));
}
#endif

void c6_geglu(const float *g, const float *u, float *y, int64_t n) {
    int64_t i = 0;
#if C6_USE_NEON
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_f32(vgelu(vld1q_f32(g + i)), vld1q_f32(u + i)));
#else
    for (; i + C6_VL <= n; i += C6_VL) *(c6_vfu *)(y + i) = vgelu(c6_ldu(g + i)) * c6_ldu(u + i);
#endif
    for (; i < n; i++) y[i] = gelu1(g[i]) * u[i];
}

void c6_gelu(const float *x, float *y, int64_t n) {
    int64_t i = 0;
#if C6_USE_NEON
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vgelu(vld1q_f32(x + i)));
#else
    for (; i + C6_VL <= n; i += C6_VL) *(c6_vfu *)(y + i) = vgelu(c6_ldu(x + i));
#endif
    for (; i < n; i++) y[i] = gelu1(x[i]);
}

void c6_exp(const float *x, float *y, int64_t n) {
    int64_t i = 0;
#if C6_USE_NEON
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, c6_vexpq(vld1q_f32(x + i)));
#else
    for (; i + C6_VL <= n; i += C6_VL) *(c6_vfu *)(y + i) = c6_vexp2(c6_ldu(x + i), (c6_vf){0});
#endif
    for (; i < n; i++) y[i] = c6_expf(x[i]);
}

/* rope: x,y [T,H,D], pos [T]; theta_i = pos*freq_scale*base^(-2i/rot_dim), cos/sin in double */
/* cos/sin of the last call on this thread: q and k of a layer, and consecutive layers with the
 * same base, rotate the same positions, so the table (T x rot_dim/2 sincos in double) is reused */
static __thread struct {
    int valid;
    int64_t T, half;
    double base, fs;
} rope_cache;  /* what the table in scratch slots 4 (positions) and 5 (cos/sin) holds */

static const float *rope_table(const int32_t *pos, int64_t T, int64_t half, int64_t rot_dim, double base,
                               double freq_scale) {
    int32_t *cpos = (int32_t *)c6_scratch(4, (size_t)T);
    float *cs = c6_scratch(5, (size_t)(T * 2 * half));  /* [T][2*half]: cos then sin */
    if (!cpos || !cs) abort();
    if (rope_cache.valid && rope_cache.T == T && rope_cache.half == half && rope_cache.base == base &&
        rope_cache.fs == freq_scale && memcmp(cpos, pos, sizeof(int32_t) * (size_t)T) == 0)
        return cs;
    double *inv = malloc(sizeof(double) * (size_t)half);
    if (!inv) abort();
    for (int64_t i = 0; i < half; i++) inv[i] = pow(base, -2.0 * (double)i / (double)rot_dim);
    for (int64_t t = 0; t < T; t++) {
        double p = (double)pos[t] * freq_scale;
        float *cv = cs + t * 2 * half, *sv = cv + half;
        for (int64_t i = 0; i < half; i++) {
            double th = p * inv[i];
            cv[i] = (float)cos(th);
            sv[i] = (float)sin(th);
        }
    }
    free(inv);
    memcpy(cpos, pos, sizeof(int32_t) * (size_t)T);
    rope_cache.valid = 1;
    rope_cache.T = T; rope_cache.half = half; rope_cache.base = base; rope_cache.fs = freq_scale;
    return cs;
}

void c6_rope(const float *x, const int32_t *pos, float *y, int64_t T, int64_t H, int64_t D,
             int64_t rot_dim, int neox, double base, double freq_scale) {
    int64_t half = rot_dim / 2;
    const float *table = rope_table(pos, T, half, rot_dim, base, freq_scale);
    for (int64_t t = 0; t < T; t++) {
        const float *cv = table + t * 2 * half, *sv = cv + half;
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + (t * H + h) * D;
            float *yr = y + (t * H + h) * D;
            int64_t i = 0;
            if (neox) {
#if C6_USE_NEON
                for (; i + 4 <= half; i += 4) {
                    float32x4_t x0 = vld1q_f32(xr + i), x1 = vld1q_f32(xr + i + half);
                    float32x4_t c = vld1q_f32(cv + i), s = vld1q_f32(sv + i);
                    vst1q_f32(yr + i, vfmsq_f32(vmulq_f32(x0, c), x1, s));
                    vst1q_f32(yr + i + half, vfmaq_f32(vmulq_f32(x0, s), x1, c));
                }
#endif
                for (; i < half; i++) {
                    float x0 = xr[i], x1 = xr[i + half];
                    yr[i] = x0 * cv[i] - x1 * sv[i];
                    yr[i + half] = x0 * sv[i] + x1 * cv[i];
                }
            } else {
#if C6_USE_NEON
                for (; i + 4 <= half; i += 4) {
                    float32x4x2_t v = vld2q_f32(xr + 2 * i);
                    float32x4_t c = vld1q_f32(cv + i), s = vld1q_f32(sv + i);
                    float32x4x2_t o;
                    o.val[0] = vfmsq_f32(vmulq_f32(v.val[0], c), v.val[1], s);
                    o.val[1] = vfmaq_f32(vmulq_f32(v.val[0], s), v.val[1], c);
                    vst2q_f32(yr + 2 * i, o);
                }
#endif
                for (; i < half; i++) {
                    float x0 = xr[2 * i], x1 = xr[2 * i + 1];
                    yr[2 * i] = x0 * cv[i] - x1 * sv[i];
                    yr[2 * i + 1] = x0 * sv[i] + x1 * cv[i];
                }
            }
            if (yr != xr)
                for (int64_t d = 2 * half; d < D; d++) yr[d] = xr[d];
        }
    }
}
