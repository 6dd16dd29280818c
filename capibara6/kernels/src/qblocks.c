/* GGUF block formats: block sizes, fp16 scales, unpacking a weight row to int8 values with its
 * block and sub-block scales, and exact dequantization (c6_qdequant). */
#include "qblocks.h"

int c6_qinfo(int t, qinfo *q) {
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
    if (!c6_qinfo(wtype, &q)) return 0;
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

/* ---------------------------------------------------------------- weight row unpacking */

/* bit j of a byte -> byte j of 8 bytes: 0x00 if set, 0xF0 if clear (Q5_0's fifth bit, minus 16) */
static uint64_t high5_lut[256];
__attribute__((constructor)) static void high5_init(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t x = 0;
        for (int j = 0; j < 8; j++) if (!(v >> j & 1)) x |= (uint64_t)0xF0 << (8 * j);
        high5_lut[v] = x;
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

void c6_unpack_row(int t, const uint8_t *restrict w, int64_t nb, qrow *r) {
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
        case T_Q8_0:
            r->d[b] = f16s(w + b * 34);
            memcpy(r->q + b * 32, w + b * 34 + 2, 32);
            break;
        }
    }
}

/* y[R,K] = dequantized rows (exact: the block formulas, in float) */
int c6_qdequant(const void *w, int wtype, float *y, int64_t R, int64_t K) {
    qinfo qi;
    if (!c6_qinfo(wtype, &qi) || K <= 0 || K % qi.qk) return -1;
    int64_t nb = K / qi.qk, row_bytes = nb * qi.bytes;
    int8_t *q = malloc((size_t)K);
    float *d = malloc(sizeof(float) * (size_t)(2 * nb));
    int16_t *sc = malloc(sizeof(int16_t) * (size_t)(K / 16));
    int32_t *mn = malloc(sizeof(int32_t) * (size_t)(K / 32));
    if (!q || !d || !sc || !mn) { free(q); free(d); free(sc); free(mn); return -2; }
    qrow r = {q, d, d + nb, sc, mn};
    for (int64_t i = 0; i < R; i++) c6_dequant_row(wtype, (const uint8_t *)w + i * row_bytes, K, &r, y + i * K);
    free(q); free(d); free(sc); free(mn);
    return 0;
}

float *c6_qrow_scratch(int slot, int64_t K, int64_t nb, int64_t extra, qrow *r) {
    /* q[K] int8 | d[nb] | dmin[nb] | mn[K/32] int32 | sc[K/16] int16 | extra */
    float *s = c6_scratch(slot, (size_t)(K / 4 + 2 * nb + K / 32 + K / 32 + extra + 16));
    if (!s) abort();
    r->q = (int8_t *)s;
    r->d = s + K / 4;
    r->dmin = r->d + nb;
    r->mn = (int32_t *)(r->dmin + nb);
    r->sc = (int16_t *)(r->mn + K / 32);
    return s + K / 4 + 2 * nb + K / 32 + K / 32;
}

void c6_dequant_row(int t, const uint8_t *restrict raw, int64_t K, qrow *r, float *restrict o) {
    qinfo qi;
    c6_qinfo(t, &qi);
    int64_t nb = K / qi.qk;
    c6_unpack_row(t, raw, nb, r);
    const int8_t *q = r->q;
    for (int64_t b = 0; b < nb; b++) {
        if (!qi.kquant) {
            float d = r->d[b];
            for (int j = 0; j < 32; j++) o[b * 32 + j] = d * (float)q[b * 32 + j];
        } else if (t == T_Q6_K) {
            for (int s = 0; s < 16; s++) {
                float f = r->d[b] * (float)r->sc[b * 16 + s];
                for (int j = 0; j < 16; j++) o[b * 256 + s * 16 + j] = f * (float)q[b * 256 + s * 16 + j];
            }
        } else {
            for (int s = 0; s < 8; s++) {
                float f = r->d[b] * (float)r->sc[b * 16 + 2 * s], m = r->dmin[b] * (float)r->mn[b * 8 + s];
                for (int j = 0; j < 32; j++) o[b * 256 + s * 32 + j] = f * (float)q[b * 256 + s * 32 + j] - m;
            }
        }
    }
}
