/* attention: out[T,Hq,D] = softmax(scale * q k^T + causal/window mask) v, GQA (head h uses kv head
 * h / (Hq/Hkv)); q [T,Hq,D] f32; k,v [S,Hkv,D] f32 or FP8 e4m3fn + scales [S,Hkv]. Query t sits at
 * position p = n_past + t and sees keys j <= p (and p - j < window if window > 0). ring > 0: the
 * cache is a ring of S = ring rows, key j in row j % ring (sliding-window layers keep only what
 * they can still see).
 * Online softmax over KV tiles of C6_AT_TILE keys: scratch is O(g*(D + tile)), independent of S.
 * One task = (block of 16 query rows, kv head) handling its 16*g query vectors together so each
 * K/V row is loaded (and FP8-decoded) once per block; when there are fewer such tasks than threads
 * (decode), the key range is split across tasks and the partial (max, sum, acc) results are merged
 * (flash-decoding).
 * c6_attention_paged: the same per sequence, for several sequences in one call over a pool of
 * fixed-size blocks: key j of a sequence is row j % block of block table[j / block]. The row
 * address is the only difference from c6_attention on the gathered keys, so each sequence's result
 * is bit-identical to that call (same tiles, same split decision, same arithmetic). */
#include "capibara6_kernels.h"
#include <math.h>
#include <stdlib.h>

#define C6_AT_TILE 64

typedef struct {
    const float *q; const float *kf, *vf; const uint8_t *k8, *v8; const float *ks, *vs;
    float *out, *part;
    const int32_t *table;                  /* paged: block ids of this sequence (else NULL) */
    int64_t T, Hq, Hkv, D, n_past, window, nsplit, ring, block;
    float scale;
} at_ctx;

static inline float dotf(const float *restrict a, const float *restrict b, int64_t D) {
    int64_t i = 0;
    float s;
#if C6_USE_NEON
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 16 <= D; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
        a1 = vfmaq_f32(a1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
    }
    for (; i + 4 <= D; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(a + i), vld1q_f32(b + i));
    s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
#else
    c6_vf a0 = {0}, a1 = {0};
    for (; i + 2 * C6_VL <= D; i += 2 * C6_VL) {
        a0 += c6_ldu(a + i) * c6_ldu(b + i);
        a1 += c6_ldu(a + i + C6_VL) * c6_ldu(b + i + C6_VL);
    }
    s = c6_hsum(a0 + a1);
#endif
    for (; i < D; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, int64_t D) {
    int64_t i = 0;
#if C6_USE_NEON
    for (; i + 4 <= D; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
#endif
    for (; i < D; i++) y[i] += a * x[i];
}

/* out[i] = q . k_i for 4 keys (q loaded once per chunk) */
static inline void dot1x4(const float *restrict q, const float *k0, const float *k1, const float *k2,
                          const float *k3, int64_t D, float *out) {
    int64_t i = 0;
    float s0, s1, s2, s3;
#if C6_USE_NEON
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; i + 8 <= D; i += 8) {
        float32x4_t x0 = vld1q_f32(q + i), x1 = vld1q_f32(q + i + 4);
        a0 = vfmaq_f32(a0, x0, vld1q_f32(k0 + i)); b0 = vfmaq_f32(b0, x1, vld1q_f32(k0 + i + 4));
        a1 = vfmaq_f32(a1, x0, vld1q_f32(k1 + i)); b1 = vfmaq_f32(b1, x1, vld1q_f32(k1 + i + 4));
        a2 = vfmaq_f32(a2, x0, vld1q_f32(k2 + i)); b2 = vfmaq_f32(b2, x1, vld1q_f32(k2 + i + 4));
        a3 = vfmaq_f32(a3, x0, vld1q_f32(k3 + i)); b3 = vfmaq_f32(b3, x1, vld1q_f32(k3 + i + 4));
    }
    s0 = vaddvq_f32(vaddq_f32(a0, b0)); s1 = vaddvq_f32(vaddq_f32(a1, b1));
    s2 = vaddvq_f32(vaddq_f32(a2, b2)); s3 = vaddvq_f32(vaddq_f32(a3, b3));
#else
    c6_vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    for (; i + C6_VL <= D; i += C6_VL) {
        c6_vf x = c6_ldu(q + i);
        a0 += x * c6_ldu(k0 + i); a1 += x * c6_ldu(k1 + i);
        a2 += x * c6_ldu(k2 + i); a3 += x * c6_ldu(k3 + i);
    }
    s0 = c6_hsum(a0); s1 = c6_hsum(a1); s2 = c6_hsum(a2); s3 = c6_hsum(a3);
#endif
    for (; i < D; i++) { s0 += q[i] * k0[i]; s1 += q[i] * k1[i]; s2 += q[i] * k2[i]; s3 += q[i] * k3[i]; }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

/* acc[D] += sum_j w[j] * v_j[D] over n keys, accumulating a chunk of acc in registers */
static inline void pv_row(float *restrict acc, const float *restrict w, const float *const *vr, int64_t n,
                          int64_t D) {
    int64_t d = 0;
#if C6_USE_NEON
    for (; d + 16 <= D; d += 16) {
        float32x4_t a0 = vld1q_f32(acc + d), a1 = vld1q_f32(acc + d + 4);
        float32x4_t a2 = vld1q_f32(acc + d + 8), a3 = vld1q_f32(acc + d + 12);
        for (int64_t j = 0; j < n; j++) {
            const float *v = vr[j] + d;
            float32x4_t wj = vdupq_n_f32(w[j]);
            a0 = vfmaq_f32(a0, wj, vld1q_f32(v)); a1 = vfmaq_f32(a1, wj, vld1q_f32(v + 4));
            a2 = vfmaq_f32(a2, wj, vld1q_f32(v + 8)); a3 = vfmaq_f32(a3, wj, vld1q_f32(v + 12));
        }
        vst1q_f32(acc + d, a0); vst1q_f32(acc + d + 4, a1); vst1q_f32(acc + d + 8, a2); vst1q_f32(acc + d + 12, a3);
    }
#else
    for (; d + 4 * C6_VL <= D; d += 4 * C6_VL) {
        c6_vf a0 = c6_ldu(acc + d), a1 = c6_ldu(acc + d + C6_VL);
        c6_vf a2 = c6_ldu(acc + d + 2 * C6_VL), a3 = c6_ldu(acc + d + 3 * C6_VL);
        for (int64_t j = 0; j < n; j++) {
            const float *v = vr[j] + d;
            float wj = w[j];
            a0 += wj * c6_ldu(v); a1 += wj * c6_ldu(v + C6_VL);
            a2 += wj * c6_ldu(v + 2 * C6_VL); a3 += wj * c6_ldu(v + 3 * C6_VL);
        }
        *(c6_vfu *)(acc + d) = a0; *(c6_vfu *)(acc + d + C6_VL) = a1;
        *(c6_vfu *)(acc + d + 2 * C6_VL) = a2; *(c6_vfu *)(acc + d + 3 * C6_VL) = a3;
    }
    for (; d + C6_VL <= D; d += C6_VL) {
        c6_vf a0 = c6_ldu(acc + d);
        for (int64_t j = 0; j < n; j++) a0 += w[j] * c6_ldu(vr[j] + d);
        *(c6_vfu *)(acc + d) = a0;
    }
#endif
    for (; d < D; d++) {
        float a = acc[d];
        for (int64_t j = 0; j < n; j++) a += w[j] * vr[j][d];
        acc[d] = a;
    }
}

static inline void scal(float *restrict y, float a, int64_t D) {
    for (int64_t i = 0; i < D; i++) y[i] *= a;
}

/* s[i] = exp(s[i] - m) (0 where s[i] == -inf: masked); returns the sum. m is finite. */
static inline double exp_sub(float *restrict s, int64_t n, float m) {
    int64_t i = 0;
    float part = 0.0f;
#if C6_USE_NEON
    float32x4_t vm = vdupq_n_f32(m), acc = vdupq_n_f32(0), ninf = vdupq_n_f32(-INFINITY);
    for (; i + 4 <= n; i += 4) {
        float32x4_t sv = vld1q_f32(s + i);
        float32x4_t e = c6_vexpq(vsubq_f32(sv, vm));
        e = vbslq_f32(vceqq_f32(sv, ninf), vdupq_n_f32(0), e);
        vst1q_f32(s + i, e);
        acc = vaddq_f32(acc, e);
    }
    part = vaddvq_f32(acc);
#endif
    for (int64_t j = i; j < n; j++) {
        float e = c6_expf(s[j] - m);
        s[j] = s[j] == -INFINITY ? 0.0f : e;
    }
    for (; i < n; i++) part += s[i];
    return part;
}

/* one task = (block of up to C6_AT_QB query rows, kv head, key split): every K/V row of a tile is
 * loaded (FP8: decoded) once and used by QB*g query vectors */
#define C6_AT_QB 16
static void att_task(void *vctx, int64_t task) {
    const at_ctx *c = vctx;
    int64_t D = c->D, Hq = c->Hq, Hkv = c->Hkv, g = Hq / Hkv;
    int64_t sp = task % c->nsplit, rest = task / c->nsplit;
    int64_t hk = rest % Hkv, tb = rest / Hkv;
    int64_t t0 = tb * C6_AT_QB, t1 = t0 + C6_AT_QB < c->T ? t0 + C6_AT_QB : c->T;
    int64_t nq = (t1 - t0) * g;                      /* query vectors in this task */
    int64_t p0 = c->n_past + t0, p1 = c->n_past + t1 - 1;
    int64_t lo = 0, hi = p1 + 1;
    if (c->window > 0 && p0 - c->window + 1 > 0) lo = p0 - c->window + 1;
    int64_t len = hi - lo;
    int64_t a = lo + len * sp / c->nsplit, b = lo + len * (sp + 1) / c->nsplit;

    int fp8 = c->k8 != NULL;
    size_t tilebuf = fp8 ? (size_t)(2 * C6_AT_TILE * D) : 0;
    float *buf = c6_scratch(3, (size_t)(nq * D + nq * C6_AT_TILE + nq + 64) + tilebuf);
    double *l = malloc(sizeof(double) * (size_t)nq);
    if (!buf || !l) abort();
    float *acc = buf, *sc = acc + nq * D, *mx = sc + nq * C6_AT_TILE, *kt = mx + nq + 16, *vt = kt + C6_AT_TILE * D;
    const float *kp[C6_AT_TILE], *vp[C6_AT_TILE];
    for (int64_t qi = 0; qi < nq; qi++) { mx[qi] = -INFINITY; l[qi] = 0.0; }
    memset(acc, 0, sizeof(float) * (size_t)(nq * D));

    for (int64_t j0 = a; j0 < b; j0 += C6_AT_TILE) {
        int64_t jn = b - j0 < C6_AT_TILE ? b - j0 : C6_AT_TILE;
        for (int64_t jj = 0; jj < jn; jj++) {      /* K/V rows of the tile (FP8: decoded once) */
            int64_t j = j0 + jj, row;
            if (c->table) row = ((int64_t)c->table[j / c->block] * c->block + j % c->block) * Hkv + hk;
            else row = (c->ring > 0 ? j % c->ring : j) * Hkv + hk;
            if (fp8) {
                c6_fp8_decode_row(c->k8 + row * D, c->ks[row], kt + jj * D, D);
                c6_fp8_decode_row(c->v8 + row * D, c->vs[row], vt + jj * D, D);
                kp[jj] = kt + jj * D; vp[jj] = vt + jj * D;
            } else {
                kp[jj] = c->kf + row * D; vp[jj] = c->vf + row * D;
            }
        }
        for (int64_t t = t0; t < t1; t++) {
            int64_t p = c->n_past + t;
            const float *qv = c->q + (t * Hq + hk * g) * D;
            for (int64_t gi = 0; gi < g; gi++) {
                float *s = sc + ((t - t0) * g + gi) * C6_AT_TILE;
                const float *qq = qv + gi * D;
                int64_t jj = 0;
                for (; jj + 4 <= jn; jj += 4) dot1x4(qq, kp[jj], kp[jj + 1], kp[jj + 2], kp[jj + 3], D, s + jj);
                for (; jj < jn; jj++) s[jj] = dotf(qq, kp[jj], D);
                for (jj = 0; jj < jn; jj++) {
                    int64_t j = j0 + jj;
                    int vis = j <= p && (c->window <= 0 || p - j < c->window);
                    s[jj] = vis ? s[jj] * c->scale : -INFINITY;
                }
            }
        }
        for (int64_t qi = 0; qi < nq; qi++) {
            float *s = sc + qi * C6_AT_TILE;
            float mt = mx[qi];
            for (int64_t jj = 0; jj < jn; jj++) mt = s[jj] > mt ? s[jj] : mt;
            if (mt == -INFINITY) continue;          /* nothing visible yet for this row */
            if (mt > mx[qi]) {
                float corr = mx[qi] == -INFINITY ? 0.0f : c6_expf(mx[qi] - mt);
                l[qi] *= corr;
                scal(acc + qi * D, corr, D);
                mx[qi] = mt;
            }
            l[qi] += exp_sub(s, jn, mx[qi]);
            pv_row(acc + qi * D, s, vp, jn, D);
        }
    }
    for (int64_t qi = 0; qi < nq; qi++) {
        int64_t t = t0 + qi / g, h = hk * g + qi % g;
        if (c->nsplit == 1) {
            float inv = (float)(1.0 / l[qi]);
            float *o = c->out + (t * Hq + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = acc[qi * D + d] * inv;
        } else {
            float *pp = c->part + ((t * Hq + h) * c->nsplit + sp) * (D + 2);
            pp[0] = mx[qi]; pp[1] = (float)l[qi];
            memcpy(pp + 2, acc + qi * D, sizeof(float) * (size_t)D);
        }
    }
    free(l);
}

/* the key split of a call with T query rows at n_past (flash-decoding when there are fewer tasks
 * than threads and enough keys) */
static int64_t att_nsplit(int64_t T, int64_t Hkv, int64_t n_past, int64_t window, int nt) {
    int64_t keys = n_past + T;
    if (window > 0 && window < keys) keys = window;
    int64_t ntb = (T + C6_AT_QB - 1) / C6_AT_QB;
    return ntb * Hkv < nt && keys >= 256 ? nt : 1;
}

/* out[r] for r < R rows = the merge of the nsplit partial (max, sum, acc[D]) results in part */
static void att_merge(const float *part, float *out, int64_t R, int64_t nsplit, int64_t D) {
    for (int64_t r = 0; r < R; r++) {
        const float *pp = part + r * nsplit * (D + 2);
        float m = -INFINITY;
        for (int64_t s = 0; s < nsplit; s++) m = pp[s * (D + 2)] > m ? pp[s * (D + 2)] : m;
        double L = 0.0;
        float *o = out + r * D;
        memset(o, 0, sizeof(float) * (size_t)D);
        for (int64_t s = 0; s < nsplit; s++) {
            const float *ps = pp + s * (D + 2);
            if (ps[1] == 0.0f) continue;
            float w = c6_expf(ps[0] - m);
            L += (double)ps[1] * w;
            axpy(o, w, ps + 2, D);
        }
        scal(o, (float)(1.0 / L), D);
    }
}

static void at_init(at_ctx *c, const float *q, const void *k, const void *v, const float *k_scale,
                    const float *v_scale, int kv_fp8, float *out, int64_t T, int64_t Hq, int64_t Hkv,
                    int64_t D, int64_t n_past, float scale, int64_t window) {
    memset(c, 0, sizeof *c);
    c->q = q; c->out = out; c->T = T; c->Hq = Hq; c->Hkv = Hkv; c->D = D; c->n_past = n_past;
    c->window = window; c->scale = scale; c->nsplit = 1;
    if (kv_fp8) { c->k8 = k; c->v8 = v; c->ks = k_scale; c->vs = v_scale; }
    else { c->kf = k; c->vf = v; }
}

int c6_attention(const float *q, const void *k, const void *v, const float *k_scale,
                 const float *v_scale, int kv_fp8, float *out, int64_t T, int64_t Hq, int64_t Hkv,
                 int64_t D, int64_t n_past, float scale, int64_t window, int64_t ring) {
    if (T <= 0 || Hq <= 0) return 0;
    at_ctx c;
    at_init(&c, q, k, v, k_scale, v_scale, kv_fp8, out, T, Hq, Hkv, D, n_past, scale, window);
    c.ring = ring;
    c.nsplit = att_nsplit(T, Hkv, n_past, window, c6_get_num_threads());
    int64_t ntb = (T + C6_AT_QB - 1) / C6_AT_QB;
    if (c.nsplit > 1) {
        c.part = malloc(sizeof(float) * (size_t)(T * Hq * c.nsplit * (D + 2)));
        if (!c.part) return -1;
    }
    c6_parallel_for(ntb * Hkv * c.nsplit, att_task, &c);
    if (c.nsplit > 1) {
        att_merge(c.part, out, T * Hq, c.nsplit, D);
        free(c.part);
    }
    return 0;
}

/* ---- paged: all sequences' tasks in one parallel_for ---- */
typedef struct {
    at_ctx *seq;          /* one context per sequence (T = its rows) */
    const int64_t *first; /* first[i] = first global task of sequence i; first[n] = all tasks */
    int64_t n;
} at_paged_ctx;

static void att_paged_task(void *vctx, int64_t task) {
    const at_paged_ctx *pc = vctx;
    int64_t lo = 0, hi = pc->n;             /* the sequence i with first[i] <= task < first[i+1] */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (pc->first[mid] <= task) lo = mid; else hi = mid;
    }
    att_task(&pc->seq[lo], task - pc->first[lo]);
}

/* every argument c6_attention_paged relies on to stay in bounds; bad = (sequence, table slot) */
static int att_paged_check(int64_t n_seq, int64_t T_total, const int64_t *q_start,
                           const int64_t *n_past, const int32_t *tables, int64_t max_blocks,
                           int64_t block, int64_t n_blocks, int64_t window, int64_t *bad) {
    bad[0] = -1; bad[1] = -1;
    if (q_start[0] != 0 || q_start[n_seq] != T_total) return -2;
    for (int64_t i = 0; i < n_seq; i++) {
        bad[0] = i;
        if (q_start[i + 1] < q_start[i] || q_start[i + 1] > T_total) return -2;
        int64_t T = q_start[i + 1] - q_start[i], np_ = n_past[i];
        if (np_ < 0) return -3;
        if (np_ > max_blocks * block - T) return -4;
    }
    for (int64_t i = 0; i < n_seq; i++) {          /* then the table entries that will be read */
        bad[0] = i;
        int64_t T = q_start[i + 1] - q_start[i], np_ = n_past[i];
        if (T == 0) continue;
        int64_t lo = window > 0 && np_ - window + 1 > 0 ? np_ - window + 1 : 0, hi = np_ + T;
        const int32_t *tb = tables + i * max_blocks;
        for (int64_t b = lo / block; b <= (hi - 1) / block; b++)
            if (tb[b] < 0 || tb[b] >= n_blocks) { bad[1] = b; return -5; }
    }
    return 0;
}

int c6_attention_paged(const float *q, const void *k, const void *v, const float *k_scale,
                       const float *v_scale, int kv_fp8, float *out, int64_t n_seq, int64_t T_total,
                       const int64_t *q_start, const int64_t *n_past, const int32_t *tables,
                       int64_t max_blocks, int64_t block, int64_t n_blocks, int64_t Hq, int64_t Hkv,
                       int64_t D, float scale, int64_t window, int64_t *err) {
    int64_t bad[2];
    if (!err) err = bad;
    err[0] = err[1] = -1;
    if (n_seq < 0 || T_total < 0 || block <= 0 || max_blocks < 0 || n_blocks < 0 || Hq <= 0 || Hkv <= 0 ||
        Hq % Hkv || D <= 0 || window < 0) return -6;
    int rc = att_paged_check(n_seq, T_total, q_start, n_past, tables, max_blocks, block, n_blocks, window, err);
    if (rc != 0) return rc;
    if (T_total <= 0) return 0;
    at_ctx *seq = malloc(sizeof(at_ctx) * (size_t)n_seq);
    int64_t *first = malloc(sizeof(int64_t) * (size_t)(n_seq + 1));
    if (!seq || !first) { free(seq); free(first); return -1; }
    int nt = c6_get_num_threads();
    int64_t ntasks = 0, npart = 0;
    for (int64_t i = 0; i < n_seq; i++) {
        int64_t t0 = q_start[i], T = q_start[i + 1] - t0;
        at_ctx *c = &seq[i];
        at_init(c, q + t0 * Hq * D, k, v, k_scale, v_scale, kv_fp8, out + t0 * Hq * D, T, Hq, Hkv, D,
                n_past[i], scale, window);
        c->table = tables + i * max_blocks; c->block = block;
        first[i] = ntasks;
        if (T == 0) continue;
        c->nsplit = att_nsplit(T, Hkv, n_past[i], window, nt);
        ntasks += (T + C6_AT_QB - 1) / C6_AT_QB * Hkv * c->nsplit;
        if (c->nsplit > 1) npart += T * Hq * c->nsplit * (D + 2);
    }
    first[n_seq] = ntasks;
    float *part = NULL;
    if (npart > 0) {
        part = malloc(sizeof(float) * (size_t)npart);
        if (!part) { free(seq); free(first); return -1; }
        int64_t off = 0;
        for (int64_t i = 0; i < n_seq; i++)
            if (seq[i].T > 0 && seq[i].nsplit > 1) {
                seq[i].part = part + off;
                off += seq[i].T * Hq * seq[i].nsplit * (D + 2);
            }
    }
    at_paged_ctx pc = {seq, first, n_seq};
    c6_parallel_for(ntasks, att_paged_task, &pc);
    for (int64_t i = 0; i < n_seq; i++)
        if (seq[i].part) att_merge(seq[i].part, seq[i].out, seq[i].T * Hq, seq[i].nsplit, D);
    free(part); free(seq); free(first);
    return 0;
}
