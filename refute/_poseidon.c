/*
 * refute._poseidon: a fast, bit-exact re-implementation of EZKL 23.0.5's Poseidon hash.
 *
 * Field: the BN254 scalar field, p = 0x30644e72...f0000001 (254 bits).
 * Permutation: width 2, 8 full rounds (4 + 4), 56 partial rounds, S-box x^5, halo2 round
 * structure (add round constants, S-box, multiply by the MDS matrix).
 * Hash (what ezkl.poseidon_hash computes for a list of n >= 1 field elements):
 *     state = [0, 2^64]
 *     for x in elements: state[0] += x; state = permute(state)
 *     return state[0]
 * (the halo2_gadgets ConstantLength<1> capacity tag 1 * 2^64, kept for every length).
 *
 * Constants are not embedded: they are derived at import time with the Poseidon reference
 * Grain LFSR (field=1, sbox=0, n=254, t=2, R_F=8, R_P=56; round constants by rejection
 * sampling, MDS as the Cauchy matrix 1/(x_i + y_j)), exactly like the reference script
 * generate_parameters_grain.sage, and checked at import against a known EZKL answer.
 *
 * Arithmetic: 4 x 64-bit limbs, Montgomery form (R = 2^256) with unsigned __int128.
 * Values are kept lazily reduced in [0, 2p) (valid because 4p < 2^256); only the final
 * output is brought to [0, p).
 *
 * Partial rounds use the optimised form of the Poseidon paper (appendix B) specialised to
 * t = 2: the round constants of cell 1 are pushed forward into later rounds and the MDS matrix
 * of each partial round is factored as diag(1, a) * [[m00, v], [w, 1]], so a partial round costs
 * one constant addition, the S-box and three multiplications instead of two additions and four.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

typedef uint64_t u64;
typedef unsigned __int128 u128;

#define INLINE static inline __attribute__((always_inline))
/* The multiplication kernels are deliberately not inlined: inlined into the unrolled rounds they
 * make GCC spill heavily (measured 30-40% slower). */
#ifndef KERNEL
#define KERNEL static __attribute__((noinline))
#endif
#ifndef POW5ATTR
#define POW5ATTR INLINE
#endif

#define WIDTH 2
#define FULL_ROUNDS 8
#define PARTIAL_ROUNDS 56
#define ROUNDS (FULL_ROUNDS + PARTIAL_ROUNDS)
#define HALF_FULL (FULL_ROUNDS / 2)

/* p, little-endian limbs */
static const u64 P[4] = {0x43e1f593f0000001ULL, 0x2833e84879b97091ULL, 0xb85045b68181585dULL,
                         0x30644e72e131a029ULL};
/* 2p */
static u64 P2[4];
/* -p^{-1} mod 2^64 (computed at init) */
static u64 INV;
/* R^2 mod p, used to enter Montgomery form (computed at init) */
static u64 R2[4];

typedef struct {
    u64 v[4];
} fe;

/* ---------------------------------------------------------------------------------------- */
/* limb helpers                                                                              */

/* r = a - b, returns borrow (0/1) */
INLINE u64 sub4(u64 r[4], const u64 a[4], const u64 b[4]) {
    u64 borrow = 0;
    for (int j = 0; j < 4; j++) {
        u128 x = (u128)a[j] - b[j] - borrow;
        r[j] = (u64)x;
        borrow = (u64)(x >> 64) & 1;
    }
    return borrow;
}

/* r = a + b, returns carry (0/1) */
INLINE u64 add4(u64 r[4], const u64 a[4], const u64 b[4]) {
    u64 carry = 0;
    for (int j = 0; j < 4; j++) {
        u128 x = (u128)a[j] + b[j] + carry;
        r[j] = (u64)x;
        carry = (u64)(x >> 64);
    }
    return carry;
}

/* if r >= m then r -= m (branch-free) */
INLINE void cond_sub(u64 r[4], const u64 m[4]) {
    u64 d[4];
    u64 borrow = sub4(d, r, m);
    u64 keep = (u64)0 - borrow; /* all ones when r < m */
    for (int j = 0; j < 4; j++) r[j] = (r[j] & keep) | (d[j] & ~keep);
}

/* a, b in [0, 2p): r = a + b in [0, 2p) */
INLINE void fe_add(fe *r, const fe *a, const fe *b) {
    add4(r->v, a->v, b->v); /* < 4p < 2^256: no carry out */
    cond_sub(r->v, P2);
}

/* t[0..7] = a * b */
INLINE void mul_wide(u64 t[8], const u64 a[4], const u64 b[4]) {
    u128 c;
    u64 carry = 0;
    for (int j = 0; j < 4; j++) {
        c = (u128)a[0] * b[j] + carry;
        t[j] = (u64)c;
        carry = (u64)(c >> 64);
    }
    t[4] = carry;
    for (int i = 1; i < 4; i++) {
        carry = 0;
        for (int j = 0; j < 4; j++) {
            c = (u128)a[i] * b[j] + t[i + j] + carry;
            t[i + j] = (u64)c;
            carry = (u64)(c >> 64);
        }
        t[i + 4] = carry;
    }
}

/* Montgomery reduction: r = t / R mod p, for t < p * R; result in [0, 2p). */
INLINE void mont_reduce(u64 r[4], u64 t[8]) {
    u64 hi = 0;
    for (int i = 0; i < 4; i++) {
        u64 m = t[i] * INV;
        u128 c = (u128)m * P[0] + t[i];
        c >>= 64;
        for (int j = 1; j < 4; j++) {
            c += (u128)m * P[j] + t[i + j];
            t[i + j] = (u64)c;
            c >>= 64;
        }
        c += (u128)t[i + 4] + hi;
        t[i + 4] = (u64)c;
        hi = (u64)(c >> 64);
    }
    r[0] = t[4];
    r[1] = t[5];
    r[2] = t[6];
    r[3] = t[7];
}

/* Montgomery multiplication, CIOS form: r = a * b / R mod p.
 * With a < 2p, b < 2p and 4p < R the result (a b + M p) / R is < 2p, every intermediate t stays
 * below a + p < 3p < 2^256 and the five-word accumulator never overflows, so no extra carry
 * word is needed. */
KERNEL void mont_mul4(u64 r[4], const u64 a[4], const u64 b[4]) {
    u64 t0 = 0, t1 = 0, t2 = 0, t3 = 0, t4;
    for (int i = 0; i < 4; i++) {
        const u64 bi = b[i];
        u128 c = (u128)a[0] * bi + t0;
        t0 = (u64)c;
        c = (u128)a[1] * bi + t1 + (u64)(c >> 64);
        t1 = (u64)c;
        c = (u128)a[2] * bi + t2 + (u64)(c >> 64);
        t2 = (u64)c;
        c = (u128)a[3] * bi + t3 + (u64)(c >> 64);
        t3 = (u64)c;
        t4 = (u64)(c >> 64);
        const u64 m = t0 * INV;
        c = (u128)m * P[0] + t0;
        c = (u128)m * P[1] + t1 + (u64)(c >> 64);
        t0 = (u64)c;
        c = (u128)m * P[2] + t2 + (u64)(c >> 64);
        t1 = (u64)c;
        c = (u128)m * P[3] + t3 + (u64)(c >> 64);
        t2 = (u64)c;
        t3 = t4 + (u64)(c >> 64);
    }
    r[0] = t0;
    r[1] = t1;
    r[2] = t2;
    r[3] = t3;
}

/* r = (a b + c d) / R mod p, one reduction, for a, c < 2p and b, d < p: the sum is < 4p^2, so
 * the result is < 2p and every intermediate stays below a + c + p < 5p < 2^256. */
KERNEL void mont_dot4(u64 r[4], const u64 a[4], const u64 b[4], const u64 c_[4],
                      const u64 d[4]) {
    u64 t0 = 0, t1 = 0, t2 = 0, t3 = 0, t4;
    for (int i = 0; i < 4; i++) {
        const u64 bi = b[i], di = d[i];
        u128 c = (u128)a[0] * bi + t0;
        t0 = (u64)c;
        c = (u128)a[1] * bi + t1 + (u64)(c >> 64);
        t1 = (u64)c;
        c = (u128)a[2] * bi + t2 + (u64)(c >> 64);
        t2 = (u64)c;
        c = (u128)a[3] * bi + t3 + (u64)(c >> 64);
        t3 = (u64)c;
        t4 = (u64)(c >> 64);
        c = (u128)c_[0] * di + t0;
        t0 = (u64)c;
        c = (u128)c_[1] * di + t1 + (u64)(c >> 64);
        t1 = (u64)c;
        c = (u128)c_[2] * di + t2 + (u64)(c >> 64);
        t2 = (u64)c;
        c = (u128)c_[3] * di + t3 + (u64)(c >> 64);
        t3 = (u64)c;
        t4 += (u64)(c >> 64);
        const u64 m = t0 * INV;
        c = (u128)m * P[0] + t0;
        c = (u128)m * P[1] + t1 + (u64)(c >> 64);
        t0 = (u64)c;
        c = (u128)m * P[2] + t2 + (u64)(c >> 64);
        t1 = (u64)c;
        c = (u128)m * P[3] + t3 + (u64)(c >> 64);
        t2 = (u64)c;
        t3 = t4 + (u64)(c >> 64);
    }
    r[0] = t0;
    r[1] = t1;
    r[2] = t2;
    r[3] = t3;
}

/* a, b in [0, 2p): r = a * b / R in [0, 2p) */
INLINE void fe_mul(fe *r, const fe *a, const fe *b) { mont_mul4(r->v, a->v, b->v); }

INLINE void fe_sqr(fe *r, const fe *a) { mont_mul4(r->v, a->v, a->v); }

/* r = (a * b + c * d) / R with a, c in [0, 2p) and b, d in [0, p); result in [0, 2p). */
INLINE void fe_dot2(fe *r, const fe *a, const fe *b, const fe *c, const fe *d) {
    mont_dot4(r->v, a->v, b->v, c->v, d->v);
}

/* x^5 */
POW5ATTR void fe_pow5(fe *x) {
    fe x2, x4;
    fe_sqr(&x2, x);
    fe_sqr(&x4, &x2);
    fe_mul(x, &x4, x);
}

/* [0, 2p) -> canonical [0, p) */
INLINE void fe_canon(fe *a) { cond_sub(a->v, P); }

/* ---------------------------------------------------------------------------------------- */
/* constants                                                                                 */

static fe RC[ROUNDS][WIDTH]; /* Montgomery form, canonical */
static fe MDS[WIDTH][WIDTH]; /* Montgomery form, canonical */
/* optimised partial rounds */
static fe OPT_C0[PARTIAL_ROUNDS]; /* constant added to cell 0 */
static fe OPT_V[PARTIAL_ROUNDS];  /* sparse matrix [[m00, v], [w, 1]] */
static fe OPT_W[PARTIAL_ROUNDS];
static fe OPT_A_END;              /* cell 1 scale after the partial rounds */
static fe OPT_C_END[WIDTH];       /* constants of the first full round after them */
/* scaled rounds */
static fe SC_K[ROUNDS][WIDTH];    /* round constants divided by the cell scales */
static fe SC_V[ROUNDS - 1];       /* normalised matrix [[1, v], [1, u]] */
static fe SC_U[ROUNDS - 1];
static fe SC_LAST[WIDTH][WIDTH];  /* last round: M diag(alpha^5, beta^5) */
static fe CAPACITY;               /* 2^64 in Montgomery form */
static fe MONT_ONE;               /* R mod p */
static int READY = 0;

static void fe_from_u64(fe *r, u64 x) {
    fe a = {{x, 0, 0, 0}};
    fe b;
    memcpy(b.v, R2, sizeof R2);
    fe_mul(r, &a, &b);
    fe_canon(r);
}

/* canonical integer (< p) -> Montgomery form */
static void fe_to_mont(fe *r, const u64 x[4]) {
    fe a, b;
    memcpy(a.v, x, sizeof a.v);
    memcpy(b.v, R2, sizeof R2);
    fe_mul(r, &a, &b);
    fe_canon(r);
}

/* Montgomery form -> canonical integer */
static void fe_from_mont(u64 out[4], const fe *a) {
    u64 t[8] = {a->v[0], a->v[1], a->v[2], a->v[3], 0, 0, 0, 0};
    fe r;
    mont_reduce(r.v, t);
    fe_canon(&r);
    memcpy(out, r.v, sizeof r.v);
}

static void fe_mul_canon(fe *r, const fe *a, const fe *b) {
    fe_mul(r, a, b);
    fe_canon(r);
}

/* a^(p-2) */
static void fe_inv(fe *r, const fe *a) {
    u64 e[4];
    u64 two[4] = {2, 0, 0, 0};
    sub4(e, P, two);
    fe acc = MONT_ONE;
    for (int i = 255; i >= 0; i--) {
        fe_sqr(&acc, &acc);
        if ((e[i / 64] >> (i % 64)) & 1) fe_mul(&acc, &acc, a);
    }
    fe_canon(&acc);
    *r = acc;
}

/* Grain LFSR of the Poseidon reference implementation */
typedef struct {
    uint8_t bits[80];
    int pos; /* bit k of the sequence lives in bits[(pos + k) % 80] */
} grain_t;

static int grain_step(grain_t *g) {
    const int p = g->pos;
    int nb = g->bits[(p + 62) % 80] ^ g->bits[(p + 51) % 80] ^ g->bits[(p + 38) % 80] ^
             g->bits[(p + 23) % 80] ^ g->bits[(p + 13) % 80] ^ g->bits[p];
    g->bits[p] = (uint8_t)nb;
    g->pos = (p + 1) % 80;
    return nb;
}

static void grain_push(grain_t *g, int *n, unsigned value, int width) {
    for (int i = width - 1; i >= 0; i--) g->bits[(*n)++] = (uint8_t)((value >> i) & 1);
}

static void grain_init(grain_t *g, unsigned field, unsigned sbox, unsigned n_bits, unsigned t,
                       unsigned r_f, unsigned r_p) {
    int n = 0;
    g->pos = 0;
    grain_push(g, &n, field, 2);
    grain_push(g, &n, sbox, 4);
    grain_push(g, &n, n_bits, 12);
    grain_push(g, &n, t, 12);
    grain_push(g, &n, r_f, 10);
    grain_push(g, &n, r_p, 10);
    while (n < 80) g->bits[n++] = 1;
    for (int i = 0; i < 160; i++) grain_step(g);
}

/* one output bit: pairs (b1, b2), keep b2 when b1 == 1 */
static int grain_bit(grain_t *g) {
    for (;;) {
        int b1 = grain_step(g);
        int b2 = grain_step(g);
        if (b1) return b2;
    }
}

/* n_bits random bits, most significant first */
static void grain_bits(grain_t *g, u64 out[4], int n_bits) {
    memset(out, 0, 4 * sizeof(u64));
    for (int i = 0; i < n_bits; i++) {
        out[3] = (out[3] << 1) | (out[2] >> 63);
        out[2] = (out[2] << 1) | (out[1] >> 63);
        out[1] = (out[1] << 1) | (out[0] >> 63);
        out[0] = (out[0] << 1) | (u64)grain_bit(g);
    }
}

static int lt_p(const u64 x[4]) {
    u64 d[4];
    return (int)sub4(d, x, P);
}

/* reference generation; returns 0 on success */
static int derive_constants(void) {
    /* INV = -p^{-1} mod 2^64 by Newton iteration */
    u64 inv = 1;
    for (int i = 0; i < 7; i++) inv *= 2 - P[0] * inv;
    INV = (u64)0 - inv;
    add4(P2, P, P);
    /* R2 = 2^512 mod p by doubling 1 */
    u64 x[4] = {1, 0, 0, 0};
    for (int i = 0; i < 512; i++) {
        add4(x, x, x); /* x < p < 2^254: no overflow */
        cond_sub(x, P);
    }
    memcpy(R2, x, sizeof x);
    fe_from_u64(&MONT_ONE, 1);
    {
        u64 cap[4] = {0, 1, 0, 0}; /* 2^64: ConstantLength<1> capacity tag */
        fe_to_mont(&CAPACITY, cap);
    }

    grain_t g;
    grain_init(&g, 1, 0, 254, WIDTH, FULL_ROUNDS, PARTIAL_ROUNDS);
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < WIDTH; i++) {
            u64 c[4];
            do {
                grain_bits(&g, c, 254);
            } while (!lt_p(c));
            fe_to_mont(&RC[r][i], c);
        }
    }
    /* MDS: Cauchy matrix 1 / (x_i + y_j); 2t values reduced mod p, all distinct */
    u64 vals[2 * WIDTH][4];
    for (;;) {
        for (int k = 0; k < 2 * WIDTH; k++) {
            grain_bits(&g, vals[k], 254);
            cond_sub(vals[k], P); /* < 2^254 < 2p */
        }
        int distinct = 1;
        for (int a = 0; a < 2 * WIDTH; a++)
            for (int b = a + 1; b < 2 * WIDTH; b++)
                if (memcmp(vals[a], vals[b], sizeof vals[a]) == 0) distinct = 0;
        if (distinct) break;
    }
    for (int i = 0; i < WIDTH; i++) {
        for (int j = 0; j < WIDTH; j++) {
            fe xi, yj, s;
            fe_to_mont(&xi, vals[i]);
            fe_to_mont(&yj, vals[WIDTH + j]);
            fe_add(&s, &xi, &yj);
            fe_canon(&s);
            fe_inv(&MDS[i][j], &s);
        }
    }

    /* Optimised partial rounds (t = 2).  Before partial round r the true state is
     * (s0 + e0, a * s1 + e1) where (s0, s1) is what we store.  Then one round is
     *   s0 += c0 + e0; s0 = s0^5; (s0, s1) = [[m00, m01 a], [m10 / (m11 a), 1]] (s0, s1)
     * with a' = m11 a and e' = (m01 u1, m11 u1), u1 = c1 + e1.                           */
    fe a = MONT_ONE;
    fe e0 = {{0, 0, 0, 0}}, e1 = {{0, 0, 0, 0}};
    for (int k = 0; k < PARTIAL_ROUNDS; k++) {
        const int r = HALF_FULL + k;
        fe u0, u1, m11a, tmp;
        fe_add(&u0, &RC[r][0], &e0);
        fe_canon(&u0);
        fe_add(&u1, &RC[r][1], &e1);
        fe_canon(&u1);
        OPT_C0[k] = u0;
        fe_mul_canon(&OPT_V[k], &MDS[0][1], &a);
        fe_mul_canon(&m11a, &MDS[1][1], &a);
        fe_inv(&tmp, &m11a);
        fe_mul_canon(&OPT_W[k], &MDS[1][0], &tmp);
        a = m11a;
        fe_mul_canon(&e0, &MDS[0][1], &u1);
        fe_mul_canon(&e1, &MDS[1][1], &u1);
    }
    OPT_A_END = a;

    {
        fe alpha = MONT_ONE, beta = MONT_ONE;
        for (int r = 0; r < ROUNDS; r++) {
            const int full = r < HALF_FULL || r >= HALF_FULL + PARTIAL_ROUNDS;
            fe ia, ib, a5 = alpha, bx = beta, na, nb, ina, inb, tmp;
            fe_inv(&ia, &alpha);
            fe_inv(&ib, &beta);
            fe_mul_canon(&SC_K[r][0], &RC[r][0], &ia);
            fe_mul_canon(&SC_K[r][1], &RC[r][1], &ib);
            fe_pow5(&a5);
            fe_canon(&a5);
            if (full) {
                fe_pow5(&bx);
                fe_canon(&bx);
            }
            if (r == ROUNDS - 1) {
                fe_mul_canon(&SC_LAST[0][0], &MDS[0][0], &a5);
                fe_mul_canon(&SC_LAST[0][1], &MDS[0][1], &bx);
                fe_mul_canon(&SC_LAST[1][0], &MDS[1][0], &a5);
                fe_mul_canon(&SC_LAST[1][1], &MDS[1][1], &bx);
                break;
            }
            fe_mul_canon(&na, &MDS[0][0], &a5);
            fe_mul_canon(&nb, &MDS[1][0], &a5);
            fe_inv(&ina, &na);
            fe_inv(&inb, &nb);
            fe_mul_canon(&tmp, &MDS[0][1], &bx);
            fe_mul_canon(&SC_V[r], &tmp, &ina);
            fe_mul_canon(&tmp, &MDS[1][1], &bx);
            fe_mul_canon(&SC_U[r], &tmp, &inb);
            alpha = na;
            beta = nb;
        }
    }
    fe_add(&OPT_C_END[0], &RC[HALF_FULL + PARTIAL_ROUNDS][0], &e0);
    fe_canon(&OPT_C_END[0]);
    fe_add(&OPT_C_END[1], &RC[HALF_FULL + PARTIAL_ROUNDS][1], &e1);
    fe_canon(&OPT_C_END[1]);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* permutation                                                                               */

INLINE void full_round(fe s[2], const fe c[2]) {
    fe_add(&s[0], &s[0], &c[0]);
    fe_add(&s[1], &s[1], &c[1]);
    fe_pow5(&s[0]);
    fe_pow5(&s[1]);
    fe n0, n1;
    fe_dot2(&n0, &s[0], &MDS[0][0], &s[1], &MDS[0][1]);
    fe_dot2(&n1, &s[0], &MDS[1][0], &s[1], &MDS[1][1]);
    s[0] = n0;
    s[1] = n1;
}

/* textbook halo2 permutation (used for the import self-check and as a benchmark baseline) */
static __attribute__((noinline)) void permute_plain(fe s[2]) {
    for (int r = 0; r < ROUNDS; r++) {
        if (r < HALF_FULL || r >= HALF_FULL + PARTIAL_ROUNDS) {
            full_round(s, RC[r]);
        } else {
            fe_add(&s[0], &s[0], &RC[r][0]);
            fe_add(&s[1], &s[1], &RC[r][1]);
            fe_pow5(&s[0]);
            fe n0, n1;
            fe_dot2(&n0, &s[0], &MDS[0][0], &s[1], &MDS[0][1]);
            fe_dot2(&n1, &s[0], &MDS[1][0], &s[1], &MDS[1][1]);
            s[0] = n0;
            s[1] = n1;
        }
    }
}

static __attribute__((noinline)) void permute_opt(fe s[2]) {
    for (int r = 0; r < HALF_FULL; r++) full_round(s, RC[r]);
    for (int k = 0; k < PARTIAL_ROUNDS; k++) {
        fe_add(&s[0], &s[0], &OPT_C0[k]);
        fe_pow5(&s[0]);
        fe n0, t;
        fe_dot2(&n0, &s[0], &MDS[0][0], &s[1], &OPT_V[k]);
        fe_mul(&t, &s[0], &OPT_W[k]);
        fe_add(&s[1], &s[1], &t);
        s[0] = n0;
    }
    fe_mul(&s[1], &s[1], &OPT_A_END);
    full_round(s, OPT_C_END);
    for (int r = HALF_FULL + PARTIAL_ROUNDS + 1; r < ROUNDS; r++) full_round(s, RC[r]);
}

static __attribute__((noinline)) void permute_scaled(fe s[2]) {
    for (int r = 0; r < ROUNDS - 1; r++) {
        fe a, b, p, q;
        fe_add(&a, &s[0], &SC_K[r][0]);
        fe_add(&b, &s[1], &SC_K[r][1]);
        if (r < HALF_FULL || r >= HALF_FULL + PARTIAL_ROUNDS) {
            fe_pow5(&a);
            fe_pow5(&b);
            fe_mul(&p, &b, &SC_V[r]);
            fe_mul(&q, &b, &SC_U[r]);
        } else {
            fe_mul(&p, &b, &SC_V[r]);
            fe_mul(&q, &b, &SC_U[r]);
            fe_pow5(&a);
        }
        fe_add(&s[0], &a, &p);
        fe_add(&s[1], &a, &q);
    }
    fe a, b;
    fe_add(&a, &s[0], &SC_K[ROUNDS - 1][0]);
    fe_add(&b, &s[1], &SC_K[ROUNDS - 1][1]);
    fe_pow5(&a);
    fe_pow5(&b);
    fe_dot2(&s[0], &a, &SC_LAST[0][0], &b, &SC_LAST[0][1]);
    fe_dot2(&s[1], &a, &SC_LAST[1][0], &b, &SC_LAST[1][1]);
}

/* int64 -> Montgomery form of (v mod p) */
INLINE void fe_from_i64(fe *r, int64_t v) {
    u64 x[4];
    if (v >= 0) {
        x[0] = (u64)v;
        x[1] = x[2] = x[3] = 0;
    } else {
        u64 mag[4] = {(u64)0 - (u64)v, 0, 0, 0}; /* |v|, valid for INT64_MIN too */
        sub4(x, P, mag);
    }
    fe a, b;
    memcpy(a.v, x, sizeof x);
    memcpy(b.v, R2, sizeof R2);
    fe_mul(r, &a, &b);
}

static void hash_i64(const int64_t *values, Py_ssize_t n, int optimised, uint8_t out[32]) {
    fe s[2] = {{{0, 0, 0, 0}}, CAPACITY};
    for (Py_ssize_t i = 0; i < n; i++) {
        fe x;
        fe_from_i64(&x, values[i]);
        fe_add(&s[0], &s[0], &x);
        if (optimised == 2)
            permute_scaled(s);
        else if (optimised)
            permute_opt(s);
        else
            permute_plain(s);
    }
    u64 h[4];
    fe_from_mont(h, &s[0]);
    for (int j = 0; j < 4; j++)
        for (int b = 0; b < 8; b++) out[8 * j + b] = (uint8_t)(h[j] >> (8 * b));
}

/* ---------------------------------------------------------------------------------------- */
/* Python binding                                                                            */

static int is_int64_format(const Py_buffer *view) {
    if (view->itemsize != 8 || view->format == NULL) return 0;
    const char *f = view->format;
    if (*f == '@' || *f == '=' || *f == '<') {
#if PY_BIG_ENDIAN
        if (*f == '<') return 0;
#endif
        f++;
    }
    return (f[0] == 'q' || f[0] == 'l') && f[1] == '\0';
}

static PyObject *do_hash(PyObject *arg, int optimised) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return NULL;
    if (!is_int64_format(&view)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "expected a C-contiguous buffer of native int64");
        return NULL;
    }
    const Py_ssize_t n = view.len / 8;
    if (n == 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "cannot hash zero elements");
        return NULL;
    }
    uint8_t out[32];
    Py_BEGIN_ALLOW_THREADS
    hash_i64((const int64_t *)view.buf, n, optimised, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *py_hash(PyObject *self, PyObject *arg) {
    (void)self;
    return do_hash(arg, 1);
}

static PyObject *py_hash_plain(PyObject *self, PyObject *arg) {
    (void)self;
    return do_hash(arg, 0);
}

static PyMethodDef methods[] = {
    {"hash", py_hash, METH_O,
     "hash(buffer) -> bytes\n\nEZKL Poseidon hash of a non-empty C-contiguous int64 buffer "
     "(each value taken mod p), as 32 little-endian bytes. Releases the GIL."},
    {"hash_plain", py_hash_plain, METH_O,
     "hash_plain(buffer) -> bytes\n\nSame as hash() with the textbook (unoptimised) "
     "permutation; for benchmarks and cross-checks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "refute._poseidon",
    "Native EZKL-compatible Poseidon hash (BN254, width 2, rate 1).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* ezkl.poseidon_hash([1]) as little-endian bytes (EZKL 23.0.5) */
static const uint8_t KAT_ONE[32] = {
    0x90, 0xbb, 0xb9, 0xc2, 0xad, 0xea, 0xf0, 0xb1, 0xcc, 0x6c, 0x34, 0xed, 0x80, 0xf1, 0x12, 0x66,
    0x19, 0x3a, 0xef, 0x9e, 0x5c, 0xfd, 0x18, 0xa6, 0xa1, 0xca, 0x28, 0x32, 0x61, 0x69, 0x56, 0x08,
};

PyMODINIT_FUNC PyInit__poseidon(void) {
    if (!READY) {
        if (derive_constants() != 0) {
            PyErr_SetString(PyExc_ImportError, "refute._poseidon: constant derivation failed");
            return NULL;
        }
        /* self-checks: known answer, and optimised == plain on a few inputs */
        const int64_t one = 1;
        uint8_t h[32], h2[32];
        hash_i64(&one, 1, 1, h);
        if (memcmp(h, KAT_ONE, 32) != 0) {
            PyErr_SetString(PyExc_ImportError,
                            "refute._poseidon: self-test failed (hash of [1] != EZKL's)");
            return NULL;
        }
        const int64_t probe[5] = {0, -1, INT64_MIN, INT64_MAX, 123456789};
        hash_i64(probe, 5, 1, h);
        hash_i64(probe, 5, 0, h2);
        if (memcmp(h, h2, 32) != 0) {
            PyErr_SetString(PyExc_ImportError,
                            "refute._poseidon: self-test failed (optimised != plain rounds)");
            return NULL;
        }
        READY = 1;
    }
    return PyModule_Create(&module);
}
