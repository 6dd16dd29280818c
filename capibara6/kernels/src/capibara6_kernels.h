/* capibara6 CPU kernels: public C API + internal helpers (single header).
 * All float arrays are float32, row-major, C-contiguous; sizes are int64_t element counts.
 * Each op has a portable GNU C path (auto-vectorisable; vector extensions) and a NEON path
 * (#if C6_USE_NEON) written for Neoverse-V2 (Axion C4A). */
#ifndef CAPIBARA6_KERNELS_H
#define CAPIBARA6_KERNELS_H
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#if defined(__ARM_NEON) && !defined(C6_FORCE_PORTABLE)
#define C6_USE_NEON 1
#include <arm_neon.h>
#else
#define C6_USE_NEON 0
#endif

#if !C6_USE_NEON
/* portable path: GNU C vector extensions sized for the build target (no ISA intrinsics) */
#if defined(__AVX512F__)
#define C6_VB 64
#elif defined(__AVX__)
#define C6_VB 32
#else
#define C6_VB 16
#endif
#define C6_VL (C6_VB / 4)
typedef float c6_vf __attribute__((vector_size(C6_VB)));
typedef float c6_vfu __attribute__((vector_size(C6_VB), aligned(4)));
static inline c6_vf c6_ldu(const float *p) { return *(const c6_vfu *)p; }
/* horizontal sum as a halving tree (log2(VL) dependent adds, not VL) */
static inline float c6_hsum(c6_vf v) {
    float t[C6_VL];
    memcpy(t, &v, sizeof t);
    for (int w = C6_VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) t[i] += t[i + w];
    return t[0];
}
typedef int32_t c6_vi __attribute__((vector_size(C6_VB)));
/* a > b ? a : b per lane (NaN in a -> b), i.e. x86 maxps semantics */
static inline c6_vf c6_vmax(c6_vf a, c6_vf b) {
    c6_vi m = a > b;
    return (c6_vf)(((c6_vi)a & m) | ((c6_vi)b & ~m));
}
static inline float c6_hmax(c6_vf v) { float m = v[0]; for (int i = 1; i < C6_VL; i++) m = v[i] > m ? v[i] : m; return m; }
#endif

/* ---- public API (mirrored in capibara6/kernels/build_ffi.py cdef) ---- */
int  c6_set_num_threads(int n);          /* threads used by matmul/attention (>=1); returns n */
int  c6_get_num_threads(void);          /* the calling thread's count (see c6_use_threads) */
int  c6_use_threads(int n);               /* this calling thread's jobs use n threads (0: pool default) */
int  c6_build_flags(void);                /* bit0 NEON, bit1 AVX2, bit2 AVX-512F, bit3 FMA, bit4 forced portable */

/* y[M,N] = x[M,K] @ w[N,K]^T ; w row-major [out,in] (GGUF layout). y must not alias x/w. */
void c6_matmul(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K);
/* y[R,C] = softmax(x[R,C]) over the last axis; y may equal x. */
void c6_softmax(const float *x, float *y, int64_t R, int64_t C);
/* y[R,D] = x / sqrt(mean(x^2) + eps) * w[D]; y may equal x. */
void c6_rmsnorm(const float *x, const float *w, float *y, int64_t R, int64_t D, float eps);
/* x,y [T,H,D], pos int32 [T]; rotate first rot_dim dims; neox=0: pairs (i,i+1), neox=1: pairs (i,i+rot_dim/2). */
void c6_rope(const float *x, const int32_t *pos, float *y, int64_t T, int64_t H, int64_t D,
             int64_t rot_dim, int neox, double base, double freq_scale);
/* elementwise over n: y = silu(g)*u ; y = gelu_tanh(g)*u ; y = gelu_tanh(x) ; y = exp(x). y may equal an input. */
void c6_swiglu(const float *g, const float *u, float *y, int64_t n);
void c6_geglu(const float *g, const float *u, float *y, int64_t n);
void c6_gelu(const float *x, float *y, int64_t n);
void c6_exp(const float *x, float *y, int64_t n);
/* q[R,D] = e4m3fn(clip(x/scale[r*scale_stride], -448, 448)) (RNE, NaN kept); scale_stride 0 = one scale. */
void c6_fp8_encode(const float *x, const float *scale, int64_t scale_stride, uint8_t *q, int64_t R, int64_t D);
/* y[R,D] = float(q) * scale[r*scale_stride] */
void c6_fp8_decode(const uint8_t *q, const float *scale, int64_t scale_stride, float *y, int64_t R, int64_t D);
/* scale[r] = max|x[r,:]|/448 (1.0 if 0), q = fp8_encode(x, scale) */
void c6_fp8_quantize_rows(const float *x, uint8_t *q, float *scale, int64_t R, int64_t D);
/* out[T,Hq,D] = causal (sliding-window) GQA attention; q [T,Hq,D]; k,v [S,Hkv,D] float32 (kv_fp8=0)
 * or uint8 e4m3fn with k_scale,v_scale [S,Hkv] (kv_fp8=1); rows 0..n_past+T-1 are read, or with
 * ring > 0 key position j is row j % ring (S = ring >= window + T - 1).
 * Returns 0, or -1 on allocation failure. */
int  c6_attention(const float *q, const void *k, const void *v, const float *k_scale,
                  const float *v_scale, int kv_fp8, float *out, int64_t T, int64_t Hq, int64_t Hkv,
                  int64_t D, int64_t n_past, float scale, int64_t window, int64_t ring);
/* c6_attention for n_seq sequences at once over a pool of blocks: k,v [n_blocks,block,Hkv,D] (float32
 * or FP8 + scales [n_blocks,block,Hkv]). Sequence i owns query rows q_start[i]..q_start[i+1]-1 of
 * q/out [T_total,Hq,D] (q_start[0] = 0, non-decreasing, q_start[n_seq] = T_total) at positions
 * n_past[i].. ; its key j is row j % block of block tables[i*max_blocks + j/block]. Only the blocks
 * holding keys its queries can see are read (others may be -1). Each sequence's result is
 * bit-identical to c6_attention on its gathered keys (same tiles and split decision). Everything
 * is checked before anything is read: returns 0; -1 allocation failure; -2 bad q_start; -3 n_past
 * < 0; -4 n_past + rows > max_blocks*block; -5 a table entry to read not in [0, n_blocks); -6 bad
 * sizes. err (may be NULL) gets (sequence, table slot) of the failure, -1 where not applicable. */
int  c6_attention_paged(const float *q, const void *k, const void *v, const float *k_scale,
                        const float *v_scale, int kv_fp8, float *out, int64_t n_seq, int64_t T_total,
                        const int64_t *q_start, const int64_t *n_past, const int32_t *tables,
                        int64_t max_blocks, int64_t block, int64_t n_blocks, int64_t Hq, int64_t Hkv,
                        int64_t D, float scale, int64_t window, int64_t *err);

/* Quantized weights in GGUF block layout (ggml type ids: Q4_0=2 Q5_0=6 Q8_0=8 Q4_K=12 Q5_K=13 Q6_K=14),
 * w = N rows of K/values_per_block blocks. y[M,N] = x[M,K] @ W^T the way llama.cpp's CPU backend
 * computes it (x quantized to Q8_0 or Q8_K, exact int32 block sums). Returns 0; -1 for an
 * unsupported type or K not a multiple of the block; -2 on allocation failure. */
int  c6_qmatmul(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K);
/* the same with 16-bit activations (per 32 values, scale amax/32767): ~fp32 arithmetic */
int  c6_qmatmul16(const float *x, const void *w, int wtype, float *y, int64_t M, int64_t N, int64_t K);
/* y[R,K] = dequantized rows of w (same return codes) */
int  c6_qdequant(const void *w, int wtype, float *y, int64_t R, int64_t K);
/* 1 and the block's value count and byte size if wtype is supported by c6_qmatmul, else 0 */
int  c6_qtype_block(int wtype, int *values, int *bytes);
float    c6_f16_to_f32(uint16_t h);
uint16_t c6_f32_to_f16(float f);    /* round to nearest even */

/* Crash log (crash.c): c6_crash_install(fd) puts a handler for SIGSEGV, SIGBUS, SIGILL, SIGFPE and
 * SIGABRT in front of the current ones (install faulthandler first): it writes one JSON line naming
 * the faulting thread's model to fd, then chains, so the process still dies by the signal.
 * Returns 0, -1 on error. c6_crash_set_model(id): the calling thread's model id (NULL or "" = none;
 * cut to C6_CRASH_ID - 1 bytes), also remembered as the last model set by any thread.
 * c6_crash_model: the id the handler would name into out[cap]; returns 1 (this thread's own),
 * 2 (the last one set by any thread) or 0 (none). c6_crash_format: the handler's line for signal
 * sig with si_code code and fault address addr into out[cap] (tests); returns its length. */
#define C6_CRASH_ID 128
int  c6_crash_install(int fd);
void c6_crash_set_model(const char *id);
int  c6_crash_model(char *out, int cap);
int  c6_crash_format(int sig, int code, uintptr_t addr, char *out, int cap);

/* ---- internal ---- */
typedef void (*c6_task_fn)(void *ctx, int64_t task);
/* run fn(ctx, 0..ntasks-1) on the pool (caller participates); idle workers sleep on a condvar. */
void c6_parallel_for(int64_t ntasks, c6_task_fn fn, void *ctx);
/* serial GEMM into a panel of y (row stride ldy): y[M, 0:N] = x[M,K] @ w[N,K]^T */
void c6_matmul_panel(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int64_t ldy);
/* thread-local, 64-byte aligned scratch, grown on demand, freed at thread exit. Slots: 0, 1 GEMM
 * packing; 2 qmatmul rows, rope; 3 attention, qmatmul panels; 4, 5 the rope table cache. */
#define C6_SCRATCH_SLOTS 6
float *c6_scratch(int slot, size_t nfloats);
extern float c6_fp8_table[256];
void c6_fp8_init(void);
void c6_fp8_decode_row(const uint8_t *restrict q, float s, float *restrict out, int64_t D);

static inline uint32_t c6_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float c6_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* expf(x + xlo) with Cephes-style reduction; max rel err ~1.5 ulp for normal results (see tests).
 * Branch-free so GCC vectorises loops calling it. NaN propagates; overflow -> inf; underflow -> 0. */
static inline float c6_expf2(float x, float xlo) {
    x = x < -104.0f ? -104.0f : x;
    x = x > 89.0f ? 89.0f : x;
    float t = x * 1.44269504088896341f + 12582912.0f;   /* 1.5*2^23: round to nearest int */
    float n = t - 12582912.0f;
    int32_t ni = (int32_t)c6_f2u(t) - 0x4B400000;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    r = r + xlo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t n1 = ni >> 1, n2 = ni - n1;
    return y * c6_u2f((uint32_t)(n1 + 127) << 23) * c6_u2f((uint32_t)(n2 + 127) << 23);
}
static inline float c6_expf(float x) { return c6_expf2(x, 0.0f); }

#if !C6_USE_NEON
static inline c6_vf c6_splat(float v) { return (c6_vf){0} + v; }
/* vector form of c6_expf2 for the portable path (GNU vector extensions, lane-wise identical
 * algorithm; clamps written so NaN propagates) */
/* exp(x + xlo) = 2^n * y for clamped x: Cody-Waite reduction r = x - n*ln2 (+ xlo), degree-6
 * polynomial for e^r; returns y and the integer n. Shared by c6_vexp2 and the softmax exp. */
static inline c6_vf c6_vexp_core(c6_vf x, c6_vf xlo, c6_vi *n_out) {
    c6_vf t = x * 1.44269504088896341f + 12582912.0f;
    c6_vf n = t - 12582912.0f;
    *n_out = (c6_vi)t - 0x4B400000;
    c6_vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    r = r + xlo;
    c6_vf p = c6_splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
}
static inline c6_vf c6_vexp2(c6_vf x, c6_vf xlo) {
    c6_vf lo = c6_splat(-104.0f), hi = c6_splat(89.0f);
    c6_vi m = lo > x;
    x = (c6_vf)(((c6_vi)lo & m) | ((c6_vi)x & ~m));
    m = hi < x;
    x = (c6_vf)(((c6_vi)hi & m) | ((c6_vi)x & ~m));
    c6_vi ni;
    c6_vf y = c6_vexp_core(x, xlo, &ni);
    c6_vi n1 = ni >> 1, n2 = ni - n1;
    return y * (c6_vf)((n1 + 127) << 23) * (c6_vf)((n2 + 127) << 23);
}
#endif

#if C6_USE_NEON
static inline float32x4_t c6_vexpq2(float32x4_t x, float32x4_t xlo) {
    x = vbslq_f32(vcltq_f32(x, vdupq_n_f32(-104.0f)), vdupq_n_f32(-104.0f), x);
    x = vbslq_f32(vcgtq_f32(x, vdupq_n_f32(89.0f)), vdupq_n_f32(89.0f), x);
    float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    int32x4_t ni = vcvtq_s32_f32(n);
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    r = vaddq_f32(r, xlo);
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    float32x4_t y = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    int32x4_t n1 = vshrq_n_s32(ni, 1), n2 = vsubq_s32(ni, n1);
    float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, vdupq_n_s32(127)), 23));
    float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, vdupq_n_s32(127)), 23));
    return vmulq_f32(vmulq_f32(y, s1), s2);
}
static inline float32x4_t c6_vexpq(float32x4_t x) { return c6_vexpq2(x, vdupq_n_f32(0.0f)); }
#endif

#endif
