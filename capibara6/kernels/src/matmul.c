/* matmul: y[M,N] = x[M,K] @ w[N,K]^T  (x row-major [M,K], w row-major [N,K] = GGUF [out,in]).
 * M <= C6_GEMV_MAX_M: streaming GEMV (w read once, 4 rows at a time against every x row; memory bound).
 * Otherwise GEMM: BLIS-style cache blocking (KC x NC block of w packed per task, MC x KC block of x
 * packed), MR x NR register tile microkernel. Threads split N (and M when M is large). */
#include "capibara6_kernels.h"
#include <stdlib.h>

#define C6_GEMV_MAX_M 4

#if C6_USE_NEON
#define MR 8
#define NR 12
#define KC 256
#else
#if defined(__AVX512F__)
#define VB 64
#elif defined(__AVX__)
#define VB 32
#else
#define VB 16
#endif
#define VL (VB / 4)
#define MR 6
#define NR (2 * VL)
#define KC (VL >= 16 ? 128 : 256)
typedef float vf __attribute__((vector_size(VB)));
typedef float vfu __attribute__((vector_size(VB), aligned(4)));
#endif
#define MC (MR * 16)

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---------------- GEMM microkernels: C[mr,nr] (+)= Ap[kc][MR]^T Bp[kc][NR] ---------------- */
#if C6_USE_NEON
static void ukernel(int64_t kc, const float *restrict A, const float *restrict B, float *restrict C,
                    int64_t ldc, int accum, int mr, int nr) {
    float32x4_t c00 = vdupq_n_f32(0), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;
    float32x4_t c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    float32x4_t c40 = c00, c41 = c00, c42 = c00, c50 = c00, c51 = c00, c52 = c00;
    float32x4_t c60 = c00, c61 = c00, c62 = c00, c70 = c00, c71 = c00, c72 = c00;
    for (int64_t k = 0; k < kc; k++) {
        float32x4_t a0 = vld1q_f32(A + k * MR), a1 = vld1q_f32(A + k * MR + 4);
        float32x4_t b0 = vld1q_f32(B + k * NR), b1 = vld1q_f32(B + k * NR + 4), b2 = vld1q_f32(B + k * NR + 8);
#define ROW(ci, av, l) c##ci##0 = vfmaq_laneq_f32(c##ci##0, b0, av, l); \
        c##ci##1 = vfmaq_laneq_f32(c##ci##1, b1, av, l); c##ci##2 = vfmaq_laneq_f32(c##ci##2, b2, av, l);
        ROW(0, a0, 0) ROW(1, a0, 1) ROW(2, a0, 2) ROW(3, a0, 3)
        ROW(4, a1, 0) ROW(5, a1, 1) ROW(6, a1, 2) ROW(7, a1, 3)
#undef ROW
    }
    float tile[MR * NR];
    float *T = tile; int64_t ldt = NR;
    int full = (mr == MR && nr == NR);
    if (full) { T = C; ldt = ldc; }
#define ST(ci) { float *p = T + ci * ldt; \
        if (full && accum) { vst1q_f32(p, vaddq_f32(vld1q_f32(p), c##ci##0)); \
            vst1q_f32(p + 4, vaddq_f32(vld1q_f32(p + 4), c##ci##1)); \
            vst1q_f32(p + 8, vaddq_f32(vld1q_f32(p + 8), c##ci##2)); } \
        else { vst1q_f32(p, c##ci##0); vst1q_f32(p + 4, c##ci##1); vst1q_f32(p + 8, c##ci##2); } }
    ST(0) ST(1) ST(2) ST(3) ST(4) ST(5) ST(6) ST(7)
#undef ST
    if (!full)
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                C[i * ldc + j] = accum ? C[i * ldc + j] + tile[i * NR + j] : tile[i * NR + j];
}
#else
static void ukernel(int64_t kc, const float *restrict A, const float *restrict B, float *restrict C,
                    int64_t ldc, int accum, int mr, int nr) {
    vf c[MR][2];
    for (int i = 0; i < MR; i++) { c[i][0] = (vf){0}; c[i][1] = (vf){0}; }
    for (int64_t k = 0; k < kc; k++) {
        vf b0 = *(const vf *)(B + k * NR), b1 = *(const vf *)(B + k * NR + VL);
        const float *a = A + k * MR;
        for (int i = 0; i < MR; i++) { c[i][0] += a[i] * b0; c[i][1] += a[i] * b1; }
    }
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++) {
            vfu *p = (vfu *)(C + i * ldc);
            if (accum) { p[0] += c[i][0]; p[1] += c[i][1]; }
            else { p[0] = c[i][0]; p[1] = c[i][1]; }
        }
    } else {
        float tile[MR * NR] __attribute__((aligned(64)));
        for (int i = 0; i < MR; i++) { *(vf *)(tile + i * NR) = c[i][0]; *(vf *)(tile + i * NR + VL) = c[i][1]; }
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                C[i * ldc + j] = accum ? C[i * ldc + j] + tile[i * NR + j] : tile[i * NR + j];
    }
}
#endif

/* dst[k][NR] = src[j][k] for j < nr (rows of w, stride K), zero for j >= nr: a transpose,
 * done with 8x8 (portable, GNU vector shuffles) / 4x4 (NEON trn) register transposes */
static void pack_b_panel(float *restrict dst, const float *restrict src, int64_t K, int64_t kc, int nr) {
    int64_t k0 = 0;
#if C6_USE_NEON
    if (nr == NR) {
        for (; k0 + 4 <= kc; k0 += 4)
            for (int jb = 0; jb < NR; jb += 4) {
                const float *s0 = src + (int64_t)jb * K + k0;
                float32x4_t r0 = vld1q_f32(s0), r1 = vld1q_f32(s0 + K);
                float32x4_t r2 = vld1q_f32(s0 + 2 * K), r3 = vld1q_f32(s0 + 3 * K);
                float64x2_t t0 = vreinterpretq_f64_f32(vtrn1q_f32(r0, r1));
                float64x2_t t1 = vreinterpretq_f64_f32(vtrn2q_f32(r0, r1));
                float64x2_t t2 = vreinterpretq_f64_f32(vtrn1q_f32(r2, r3));
                float64x2_t t3 = vreinterpretq_f64_f32(vtrn2q_f32(r2, r3));
                float *d = dst + k0 * NR + jb;
                vst1q_f32(d, vreinterpretq_f32_f64(vtrn1q_f64(t0, t2)));
                vst1q_f32(d + NR, vreinterpretq_f32_f64(vtrn1q_f64(t1, t3)));
                vst1q_f32(d + 2 * NR, vreinterpretq_f32_f64(vtrn2q_f64(t0, t2)));
                vst1q_f32(d + 3 * NR, vreinterpretq_f32_f64(vtrn2q_f64(t1, t3)));
            }
    }
#else
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v8u __attribute__((vector_size(32), aligned(4)));
    typedef int32_t v8i __attribute__((vector_size(32)));
    if (nr == NR && NR % 8 == 0) {
        const v8i lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
        const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
        const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
        for (; k0 + 8 <= kc; k0 += 8)
            for (int jb = 0; jb < NR; jb += 8) {
                const float *s0 = src + (int64_t)jb * K + k0;
                v8 r0 = *(const v8u *)s0, r1 = *(const v8u *)(s0 + K);
                v8 r2 = *(const v8u *)(s0 + 2 * K), r3 = *(const v8u *)(s0 + 3 * K);
                v8 r4 = *(const v8u *)(s0 + 4 * K), r5 = *(const v8u *)(s0 + 5 * K);
                v8 r6 = *(const v8u *)(s0 + 6 * K), r7 = *(const v8u *)(s0 + 7 * K);
                v8 t0 = __builtin_shuffle(r0, r1, lo1), t1 = __builtin_shuffle(r0, r1, hi1);
                v8 t2 = __builtin_shuffle(r2, r3, lo1), t3 = __builtin_shuffle(r2, r3, hi1);
                v8 t4 = __builtin_shuffle(r4, r5, lo1), t5 = __builtin_shuffle(r4, r5, hi1);
                v8 t6 = __builtin_shuffle(r6, r7, lo1), t7 = __builtin_shuffle(r6, r7, hi1);
                v8 u0 = __builtin_shuffle(t0, t2, lo2), u1 = __builtin_shuffle(t0, t2, hi2);
                v8 u2 = __builtin_shuffle(t1, t3, lo2), u3 = __builtin_shuffle(t1, t3, hi2);
                v8 u4 = __builtin_shuffle(t4, t6, lo2), u5 = __builtin_shuffle(t4, t6, hi2);
                v8 u6 = __builtin_shuffle(t5, t7, lo2), u7 = __builtin_shuffle(t5, t7, hi2);
                float *d = dst + k0 * NR + jb;
                *(v8u *)(d + 0 * NR) = __builtin_shuffle(u0, u4, lo4);
                *(v8u *)(d + 1 * NR) = __builtin_shuffle(u1, u5, lo4);
                *(v8u *)(d + 2 * NR) = __builtin_shuffle(u2, u6, lo4);
                *(v8u *)(d + 3 * NR) = __builtin_shuffle(u3, u7, lo4);
                *(v8u *)(d + 4 * NR) = __builtin_shuffle(u0, u4, hi4);
                *(v8u *)(d + 5 * NR) = __builtin_shuffle(u1, u5, hi4);
                *(v8u *)(d + 6 * NR) = __builtin_shuffle(u2, u6, hi4);
                *(v8u *)(d + 7 * NR) = __builtin_shuffle(u3, u7, hi4);
            }
    }
#endif
    for (int j = 0; j < nr; j++) {
        const float *sj = src + (int64_t)j * K;
        for (int64_t k = k0; k < kc; k++) dst[k * NR + j] = sj[k];
    }
    for (int j = nr; j < NR; j++)
        for (int64_t k = 0; k < kc; k++) dst[k * NR + j] = 0.0f;
}

typedef struct {
    const float *x, *w; float *y;
    int64_t M, N, K;
    int64_t n_per_task, m_per_task, n_tasks_n;
    int64_t ldy;  /* row stride of y (N, or wider for a panel of a larger y) */
} mm_ctx;

static void gemm_task(void *vctx, int64_t task) {
    const mm_ctx *c = vctx;
    int64_t tn = task % c->n_tasks_n, tm = task / c->n_tasks_n;
    int64_t n0 = tn * c->n_per_task, n1 = imin(c->N, n0 + c->n_per_task);
    int64_t m0 = tm * c->m_per_task, m1 = imin(c->M, m0 + c->m_per_task);
    int64_t K = c->K;
    int64_t npan = (n1 - n0 + NR - 1) / NR;
    float *Bp = c6_scratch(0, (size_t)KC * npan * NR);
    float *Ap = c6_scratch(1, (size_t)KC * MC);
    if (!Bp || !Ap) abort();
    for (int64_t pc = 0; pc < K; pc += KC) {
        int64_t kc = imin(KC, K - pc);
        /* pack w[n0:n1, pc:pc+kc] into panels Bp[p][k][NR] (zero padded) */
        for (int64_t p = 0; p < npan; p++) {
            int64_t nb = n0 + p * NR;
            pack_b_panel(Bp + p * kc * NR, c->w + nb * K + pc, K, kc, (int)imin(NR, n1 - nb));
        }
        for (int64_t ic = m0; ic < m1; ic += MC) {
            int64_t mc = imin(MC, m1 - ic);
            int64_t mpan = (mc + MR - 1) / MR;
            for (int64_t q = 0; q < mpan; q++) {
                float *dst = Ap + q * kc * MR;
                int64_t mb = ic + q * MR, mr = imin(MR, ic + mc - mb);
                for (int64_t i = 0; i < mr; i++) {
                    const float *src = c->x + (mb + i) * K + pc;
                    for (int64_t k = 0; k < kc; k++) dst[k * MR + i] = src[k];
                }
                for (int64_t i = mr; i < MR; i++)
                    for (int64_t k = 0; k < kc; k++) dst[k * MR + i] = 0.0f;
            }
            for (int64_t p = 0; p < npan; p++) {
                int64_t nb = n0 + p * NR, nr = imin(NR, n1 - nb);
                for (int64_t q = 0; q < mpan; q++) {
                    int64_t mb = ic + q * MR, mr = imin(MR, ic + mc - mb);
                    ukernel(kc, Ap + q * kc * MR, Bp + p * kc * NR, c->y + mb * c->ldy + nb, c->ldy, pc > 0,
                            (int)mr, (int)nr);
                }
            }
        }
    }
}

/* ---------------- GEMV: 4 rows of w against each of the M (<= 4) rows of x ---------------- */
#if C6_USE_NEON
static inline void dot4(const float *restrict x, const float *restrict w, int64_t K, float *out) {
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    float32x4_t a[4][4];
    for (int r = 0; r < 4; r++) for (int u = 0; u < 4; u++) a[r][u] = vdupq_n_f32(0);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        for (int u = 0; u < 4; u++) {
            float32x4_t xv = vld1q_f32(x + k + 4 * u);
            a[0][u] = vfmaq_f32(a[0][u], xv, vld1q_f32(w0 + k + 4 * u));
            a[1][u] = vfmaq_f32(a[1][u], xv, vld1q_f32(w1 + k + 4 * u));
            a[2][u] = vfmaq_f32(a[2][u], xv, vld1q_f32(w2 + k + 4 * u));
            a[3][u] = vfmaq_f32(a[3][u], xv, vld1q_f32(w3 + k + 4 * u));
        }
    }
    for (; k + 4 <= K; k += 4) {
        float32x4_t xv = vld1q_f32(x + k);
        a[0][0] = vfmaq_f32(a[0][0], xv, vld1q_f32(w0 + k));
        a[1][0] = vfmaq_f32(a[1][0], xv, vld1q_f32(w1 + k));
        a[2][0] = vfmaq_f32(a[2][0], xv, vld1q_f32(w2 + k));
        a[3][0] = vfmaq_f32(a[3][0], xv, vld1q_f32(w3 + k));
    }
    for (int r = 0; r < 4; r++) {
        float s = vaddvq_f32(vaddq_f32(vaddq_f32(a[r][0], a[r][1]), vaddq_f32(a[r][2], a[r][3])));
        const float *wr = w + r * K;
        for (int64_t kk = k; kk < K; kk++) s += x[kk] * wr[kk];
        out[r] = s;
    }
}
static inline float dot1(const float *restrict x, const float *restrict w, int64_t K) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(x + k), vld1q_f32(w + k));
        a1 = vfmaq_f32(a1, vld1q_f32(x + k + 4), vld1q_f32(w + k + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(x + k + 8), vld1q_f32(w + k + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(x + k + 12), vld1q_f32(w + k + 12));
    }
    for (; k + 4 <= K; k += 4) a0 = vfmaq_f32(a0, vld1q_f32(x + k), vld1q_f32(w + k));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}
#else
static inline vf ldu(const float *p) { return *(const vfu *)p; }
static inline float hsum(vf v) { return c6_hsum(v); }
/* out[i] = horizontal sum of a_i: transposing shuffle-adds (fewer ops than 4 separate trees) */
static inline void hsum4(vf a0, vf a1, vf a2, vf a3, float *out) {
#if VL == 16
    typedef int32_t vi __attribute__((vector_size(VB)));
    const vi l8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const vi h8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const vi l4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const vi h4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const vi p2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const vi p1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    vf s01 = __builtin_shuffle(a0, a1, l8) + __builtin_shuffle(a0, a1, h8);
    vf s23 = __builtin_shuffle(a2, a3, l8) + __builtin_shuffle(a2, a3, h8);
    vf t = __builtin_shuffle(s01, s23, l4) + __builtin_shuffle(s01, s23, h4);
    t = t + __builtin_shuffle(t, p2);
    t = t + __builtin_shuffle(t, p1);
    out[0] = t[0]; out[1] = t[4]; out[2] = t[8]; out[3] = t[12];
#else
    out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
#endif
}
static inline void dot4(const float *restrict x, const float *restrict w, int64_t K, float *out) {
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    int64_t k = 0;
    for (; k + 2 * VL <= K; k += 2 * VL) {
        vf x0 = ldu(x + k), x1 = ldu(x + k + VL);
        a0 += x0 * ldu(w0 + k); b0 += x1 * ldu(w0 + k + VL);
        a1 += x0 * ldu(w1 + k); b1 += x1 * ldu(w1 + k + VL);
        a2 += x0 * ldu(w2 + k); b2 += x1 * ldu(w2 + k + VL);
        a3 += x0 * ldu(w3 + k); b3 += x1 * ldu(w3 + k + VL);
    }
    for (; k + VL <= K; k += VL) {
        vf x0 = ldu(x + k);
        a0 += x0 * ldu(w0 + k); a1 += x0 * ldu(w1 + k); a2 += x0 * ldu(w2 + k); a3 += x0 * ldu(w3 + k);
    }
    float s[4];
    hsum4(a0 + b0, a1 + b1, a2 + b2, a3 + b3, s);
    for (int r = 0; r < 4; r++) {
        const float *wr = w + r * K;
        for (int64_t kk = k; kk < K; kk++) s[r] += x[kk] * wr[kk];
        out[r] = s[r];
    }
}
static inline float dot1(const float *restrict x, const float *restrict w, int64_t K) {
    vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t k = 0;
    for (; k + 4 * VL <= K; k += 4 * VL) {
        a0 += ldu(x + k) * ldu(w + k); a1 += ldu(x + k + VL) * ldu(w + k + VL);
        a2 += ldu(x + k + 2 * VL) * ldu(w + k + 2 * VL); a3 += ldu(x + k + 3 * VL) * ldu(w + k + 3 * VL);
    }
    for (; k + VL <= K; k += VL) a0 += ldu(x + k) * ldu(w + k);
    float s = hsum((a0 + a1) + (a2 + a3));
    for (; k < K; k++) s += x[k] * w[k];
    return s;
}
#endif

static void gemv_task(void *vctx, int64_t task) {
    const mm_ctx *c = vctx;
    int64_t n0 = task * c->n_per_task, n1 = imin(c->N, n0 + c->n_per_task);
    int64_t K = c->K, N = c->N;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) {
        const float *wb = c->w + n * K;
        for (int64_t m = 0; m < c->M; m++) {
            float o[4];
            dot4(c->x + m * K, wb, K, o);
            float *yr = c->y + m * N + n;
            yr[0] = o[0]; yr[1] = o[1]; yr[2] = o[2]; yr[3] = o[3];
        }
    }
    for (; n < n1; n++)
        for (int64_t m = 0; m < c->M; m++) c->y[m * N + n] = dot1(c->x + m * K, c->w + n * K, K);
}

void c6_matmul(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { memset(y, 0, (size_t)(M * N) * sizeof(float)); return; }
    int nt = c6_get_num_threads();
    mm_ctx c = {x, w, y, M, N, K, 0, 0, 0, N};
    if (M <= C6_GEMV_MAX_M) {
        /* ~8 tasks per thread of >= 16 rows (multiple of 4) for dynamic balancing */
        int64_t per = (N + (int64_t)nt * 8 - 1) / ((int64_t)nt * 8);
        if (per < 16) per = 16;
        per = (per + 3) & ~(int64_t)3;
        c.n_per_task = per;
        c6_parallel_for((N + per - 1) / per, gemv_task, &c);
        return;
    }
    int64_t npan = (N + NR - 1) / NR;
    int64_t m_per = M <= 512 ? M : 4 * MC;
    int64_t n_mtasks = (M + m_per - 1) / m_per;
    int64_t want = (int64_t)nt * 3;                       /* tasks wanted over N */
    int64_t ppt = (npan * n_mtasks + want - 1) / want;    /* panels per task */
    if (nt == 1) ppt = npan;
    if (ppt > 512 / NR + 1) ppt = 512 / NR + 1;           /* packed w block <= ~KC x 512 floats */
    if (ppt < 1) ppt = 1;
    c.n_per_task = ppt * NR;
    c.n_tasks_n = (npan + ppt - 1) / ppt;
    c.m_per_task = m_per;
    c6_parallel_for(c.n_tasks_n * n_mtasks, gemm_task, &c);
}

/* y[M, 0:N] (row stride ldy) = x[M,K] @ w[N,K]^T on the calling thread only: a panel of a larger
 * product whose tasks are already spread over the pool (the quantized matmul's prefill path). */
void c6_matmul_panel(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int64_t ldy) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    mm_ctx c = {x, w, y, M, N, K, N, M, 1, ldy};
    gemm_task(&c, 0);
}
