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
 * sampling, MDS as the Cauchy matrix 1/(x_i + y_j)), like generate_parameters_grain.sage, and
 * the module refuses to import unless it reproduces a known EZKL hash.
 *
 * Arithmetic: 4 x 64-bit limbs in Montgomery form (R = 2^256). Values are kept lazily reduced
 * in [0, 2p) (valid because 4p < 2^256); only the output is brought to [0, p). Two kernels:
 * portable C with unsigned __int128, and x86-64 inline assembly with MULX/ADCX/ADOX (two carry
 * chains), chosen at import from CPUID. Both give identical results; the assembly needs half
 * the instructions of what GCC makes of the C (about 1.35x faster end to end). Define
 * REFUTE_POSEIDON_NO_ASM to build without the assembly.
 *
 * Rounds use a scaled form of the permutation (in the spirit of the Poseidon paper's
 * appendix B, adapted to t = 2): a per-round diagonal change of variables, folded into the
 * constants, turns every MDS multiplication but the last into [[1, v], [1, u]], and x^5 is fused
 * with the matrix (x^4 * x + v * y with a single Montgomery reduction). A partial round is then
 * two squarings and two fused products, with three multiplications on the critical path
 * instead of four. Measured per element (x86-64, 3.9 GHz): textbook rounds 6.2 us, appendix-B
 * sparse rounds 5.9 us, scaled rounds 5.5 us with the C kernel and 4.1 us with MULX/ADX.
 * The textbook permutation is kept (hash_plain, import self-test) as the reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(REFUTE_POSEIDON_NO_ASM)
#define HAVE_ADX 1
#include <cpuid.h>
#else
#define HAVE_ADX 0
#endif

typedef uint64_t u64;
typedef unsigned __int128 u128;

#define INLINE static inline __attribute__((always_inline))
/* The multiplication kernels are deliberately not inlined: inlined into the unrolled rounds they
 * make GCC spill heavily (measured 30-40% slower). */
#define KERNEL static __attribute__((noinline))

#define WIDTH 2
#define FULL_ROUNDS 8
#define PARTIAL_ROUNDS 56
#define ROUNDS (FULL_ROUNDS + PARTIAL_ROUNDS)
#define HALF_FULL (FULL_ROUNDS / 2)

/* p, little-endian limbs */
static const u64 P[4] = {0x43e1f593f0000001ULL, 0x2833e84879b97091ULL, 0xb85045b68181585dULL,
                         0x30644e72e131a029ULL};
static u64 P2[4]; /* 2p */
static u64 INV;   /* -p^{-1} mod 2^64 */
static u64 R2[4]; /* R^2 mod p, to enter Montgomery form */

typedef struct {
    u64 v[4];
} fe;

/* ---------------------------------------------------------------------------------------- */
/* limb helpers                                                                              */

/* r = a - b, returns the borrow (0/1) */
INLINE u64 sub4(u64 r[4], const u64 a[4], const u64 b[4]) {
    u64 borrow = 0;
    for (int j = 0; j < 4; j++) {
        u128 x = (u128)a[j] - b[j] - borrow;
        r[j] = (u64)x;
        borrow = (u64)(x >> 64) & 1;
    }
    return borrow;
}

/* r = a + b, returns the carry (0/1) */
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

/* [0, 2p) -> canonical [0, p) */
INLINE void fe_canon(fe *a) { cond_sub(a->v, P); }

/* ---------------------------------------------------------------------------------------- */
/* Montgomery kernels                                                                        */
/*
 * Both kernels are CIOS (coarsely integrated operand scanning). With a, b < 2p and 4p < R the
 * result (a b + M p) / R is < 2p; every intermediate t stays below a + p < 3p < 2^256 and
 * t + a b_i + m p < 2^320, so a fifth accumulator word suffices and no carry is ever lost.
 * The fused kernel computes (a b + c d) / R with one reduction; for a, c < 2p and b, d < p the
 * sum is < 4p^2 < pR, so its result is < 2p too (intermediates < a + c + p < 5p < 2^256).
 */

/* r = a b / R, portable C */
KERNEL void mul_c(u64 r[4], const u64 a[4], const u64 b[4]) {
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

/* r = (a b + c d) / R, portable C */
KERNEL void dot_c(u64 r[4], const u64 a[4], const u64 b[4], const u64 c_[4], const u64 d[4]) {
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

#if HAVE_ADX
/*
 * x86-64 with BMI2 + ADX. Per word b_i of the multiplier: MULX forms a_j b_i; ADOX adds the low
 * halves and ADCX the high halves on two independent carry chains (OF and CF); then
 * m = t0 * INV and the same pattern adds m p, after which the five accumulator registers are
 * rotated instead of shifted. Only executed when CPUID reports BMI2 and ADX.
 */
KERNEL void mul_adx(u64 r[4], const u64 a[4], const u64 b[4]) {
    u64 t0, t1, t2, t3, t4, lo, hi, z;
    __asm__(
        "xorl %k[z], %k[z]\n\t"
        "movq 0(%[b]), %%rdx\n\t"
        "mulxq 0(%[a]), %[t0], %[t1]\n\t"
        "mulxq 8(%[a]), %[lo], %[t2]\n\t"
        "addq %[lo], %[t1]\n\t"
        "mulxq 16(%[a]), %[lo], %[t3]\n\t"
        "adcq %[lo], %[t2]\n\t"
        "mulxq 24(%[a]), %[lo], %[t4]\n\t"
        "adcq %[lo], %[t3]\n\t"
        "adcq %[z], %[t4]\n\t"
        "movq %[t0], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "adoxq %[z], %[t4]\n\t"
        "movq 8(%[b]), %%rdx\n\t"
        "xorl %k[t0], %k[t0]\n\t"
        "mulxq 0(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq 8(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 16(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 24(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "adoxq %[z], %[t0]\n\t"
        "movq %[t1], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "adoxq %[z], %[t0]\n\t"
        "movq 16(%[b]), %%rdx\n\t"
        "xorl %k[t1], %k[t1]\n\t"
        "mulxq 0(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 8(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 16(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq 24(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "adoxq %[z], %[t1]\n\t"
        "movq %[t2], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "adoxq %[z], %[t1]\n\t"
        "movq 24(%[b]), %%rdx\n\t"
        "xorl %k[t2], %k[t2]\n\t"
        "mulxq 0(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 8(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq 16(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq 24(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "adoxq %[z], %[t2]\n\t"
        "movq %[t3], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "adoxq %[z], %[t2]\n\t"
        : [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3), [t4] "=&r"(t4),
          [lo] "=&r"(lo), [hi] "=&r"(hi), [z] "=&r"(z)
        : [a] "r"(a), [b] "r"(b), [p0] "m"(P[0]), [p1] "m"(P[1]), [p2] "m"(P[2]),
          [p3] "m"(P[3]), [inv] "m"(INV), "m"(*(const u64(*)[4])a), "m"(*(const u64(*)[4])b)
        : "rdx", "cc");
    r[0] = t4;
    r[1] = t0;
    r[2] = t1;
    r[3] = t2;
}

KERNEL void dot_adx(u64 r[4], const u64 a[4], const u64 b[4], const u64 c[4], const u64 d[4]) {
    u64 t0, t1, t2, t3, t4, lo, hi, z;
    __asm__(
        "xorl %k[z], %k[z]\n\t"
        "movq 0(%[b]), %%rdx\n\t"
        "mulxq 0(%[a]), %[t0], %[t1]\n\t"
        "mulxq 8(%[a]), %[lo], %[t2]\n\t"
        "addq %[lo], %[t1]\n\t"
        "mulxq 16(%[a]), %[lo], %[t3]\n\t"
        "adcq %[lo], %[t2]\n\t"
        "mulxq 24(%[a]), %[lo], %[t4]\n\t"
        "adcq %[lo], %[t3]\n\t"
        "adcq %[z], %[t4]\n\t"
        "movq 0(%[d]), %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq 0(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq 8(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq 16(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 24(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "adoxq %[z], %[t4]\n\t"
        "movq %[t0], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "adoxq %[z], %[t4]\n\t"
        "movq 8(%[b]), %%rdx\n\t"
        "xorl %k[t0], %k[t0]\n\t"
        "mulxq 0(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq 8(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 16(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 24(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "adoxq %[z], %[t0]\n\t"
        "movq 8(%[d]), %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq 0(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq 8(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 16(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 24(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "adoxq %[z], %[t0]\n\t"
        "movq %[t1], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "adoxq %[z], %[t0]\n\t"
        "movq 16(%[b]), %%rdx\n\t"
        "xorl %k[t1], %k[t1]\n\t"
        "mulxq 0(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 8(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 16(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq 24(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "adoxq %[z], %[t1]\n\t"
        "movq 16(%[d]), %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq 0(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq 8(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 16(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq 24(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "adoxq %[z], %[t1]\n\t"
        "movq %[t2], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t2]\n\t"
        "adcxq %[hi], %[t3]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "adoxq %[z], %[t1]\n\t"
        "movq 24(%[b]), %%rdx\n\t"
        "xorl %k[t2], %k[t2]\n\t"
        "mulxq 0(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 8(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq 16(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq 24(%[a]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "adoxq %[z], %[t2]\n\t"
        "movq 24(%[d]), %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq 0(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq 8(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq 16(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq 24(%[c]), %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "adoxq %[z], %[t2]\n\t"
        "movq %[t3], %%rdx\n\t"
        "imulq %[inv], %%rdx\n\t"
        "xorl %k[lo], %k[lo]\n\t"
        "mulxq %[p0], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t3]\n\t"
        "adcxq %[hi], %[t4]\n\t"
        "mulxq %[p1], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t4]\n\t"
        "adcxq %[hi], %[t0]\n\t"
        "mulxq %[p2], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t0]\n\t"
        "adcxq %[hi], %[t1]\n\t"
        "mulxq %[p3], %[lo], %[hi]\n\t"
        "adoxq %[lo], %[t1]\n\t"
        "adcxq %[hi], %[t2]\n\t"
        "adoxq %[z], %[t2]\n\t"
        : [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3), [t4] "=&r"(t4),
          [lo] "=&r"(lo), [hi] "=&r"(hi), [z] "=&r"(z)
        : [a] "r"(a), [b] "r"(b), [c] "r"(c), [d] "r"(d), [p0] "m"(P[0]), [p1] "m"(P[1]),
          [p2] "m"(P[2]), [p3] "m"(P[3]), [inv] "m"(INV), "m"(*(const u64(*)[4])a),
          "m"(*(const u64(*)[4])b), "m"(*(const u64(*)[4])c), "m"(*(const u64(*)[4])d)
        : "rdx", "cc");
    r[0] = t4;
    r[1] = t0;
    r[2] = t1;
    r[3] = t2;
}

static int cpu_has_adx(void) {
    unsigned eax, ebx, ecx, edx;
    if (__get_cpuid_max(0, NULL) < 7) return 0;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    (void)eax;
    (void)ecx;
    (void)edx;
    return ((ebx >> 8) & 1) && ((ebx >> 19) & 1); /* BMI2 (MULX) and ADX */
}
#endif

#if HAVE_ADX
/* r = (a + b) mod p in [0, p) for a + b < 3p: add, then twice "subtract p unless that borrows"
 * (SUB/SBB and CMOVNC: branch-free, and about three times faster than what GCC makes of the
 * portable version, which matters because this addition sits on the critical path) */
INLINE void add_canon_x86(u64 r[4], const u64 a[4], const u64 b[4]) {
    u64 x0 = a[0], x1 = a[1], x2 = a[2], x3 = a[3], y0, y1, y2, y3;
    __asm__(
        "addq 0(%[b]), %[x0]\n\t"
        "adcq 8(%[b]), %[x1]\n\t"
        "adcq 16(%[b]), %[x2]\n\t"
        "adcq 24(%[b]), %[x3]\n\t"
        "movq %[x0], %[y0]\n\t"
        "movq %[x1], %[y1]\n\t"
        "movq %[x2], %[y2]\n\t"
        "movq %[x3], %[y3]\n\t"
        "subq %[p0], %[y0]\n\t"
        "sbbq %[p1], %[y1]\n\t"
        "sbbq %[p2], %[y2]\n\t"
        "sbbq %[p3], %[y3]\n\t"
        "cmovncq %[y0], %[x0]\n\t"
        "cmovncq %[y1], %[x1]\n\t"
        "cmovncq %[y2], %[x2]\n\t"
        "cmovncq %[y3], %[x3]\n\t"
        "movq %[x0], %[y0]\n\t"
        "movq %[x1], %[y1]\n\t"
        "movq %[x2], %[y2]\n\t"
        "movq %[x3], %[y3]\n\t"
        "subq %[p0], %[y0]\n\t"
        "sbbq %[p1], %[y1]\n\t"
        "sbbq %[p2], %[y2]\n\t"
        "sbbq %[p3], %[y3]\n\t"
        "cmovncq %[y0], %[x0]\n\t"
        "cmovncq %[y1], %[x1]\n\t"
        "cmovncq %[y2], %[x2]\n\t"
        "cmovncq %[y3], %[x3]\n\t"
        : [x0] "+&r"(x0), [x1] "+&r"(x1), [x2] "+&r"(x2), [x3] "+&r"(x3), [y0] "=&r"(y0),
          [y1] "=&r"(y1), [y2] "=&r"(y2), [y3] "=&r"(y3)
        : [b] "r"(b), [p0] "m"(P[0]), [p1] "m"(P[1]), [p2] "m"(P[2]), [p3] "m"(P[3]),
          "m"(*(const u64(*)[4])b)
        : "cc");
    r[0] = x0;
    r[1] = x1;
    r[2] = x2;
    r[3] = x3;
}
#endif

/* Field operations, parameterised by the kernel (a compile-time constant after inlining). */
enum { K_C = 0, K_ADX = 1 };

INLINE void fe_mul(int k, fe *r, const fe *a, const fe *b) {
#if HAVE_ADX
    if (k == K_ADX) {
        mul_adx(r->v, a->v, b->v);
        return;
    }
#endif
    (void)k;
    mul_c(r->v, a->v, b->v);
}

/* r = (a b + c d) / R for a, c in [0, 2p) and b, d in [0, p); result in [0, 2p) */
INLINE void fe_dot2(int k, fe *r, const fe *a, const fe *b, const fe *c, const fe *d) {
#if HAVE_ADX
    if (k == K_ADX) {
        dot_adx(r->v, a->v, b->v, c->v, d->v);
        return;
    }
#endif
    (void)k;
    dot_c(r->v, a->v, b->v, c->v, d->v);
}

/* r = (a + b) mod p in [0, p), for a + b < 3p */
INLINE void fe_add_canon(int k, fe *r, const fe *a, const fe *b) {
#if HAVE_ADX
    if (k == K_ADX) {
        add_canon_x86(r->v, a->v, b->v);
        return;
    }
#endif
    (void)k;
    fe_add(r, a, b);
    fe_canon(r);
}

/* x^5 */
INLINE void fe_pow5(int k, fe *x) {
    fe x2, x4;
    fe_mul(k, &x2, x, x);
    fe_mul(k, &x4, &x2, &x2);
    fe_mul(k, x, &x4, x);
}

/* ---------------------------------------------------------------------------------------- */
/* constants                                                                                 */

static fe RC[ROUNDS][WIDTH]; /* round constants, Montgomery form, canonical */
static fe MDS[WIDTH][WIDTH]; /* MDS matrix, Montgomery form, canonical */
/* scaled rounds (see derive_constants) */
static fe SC_K[ROUNDS][WIDTH];   /* round constants divided by the cell scales */
static fe SC_V[ROUNDS - 1];      /* normalised matrices [[1, v], [1, u]] */
static fe SC_U[ROUNDS - 1];
static fe SC_LAST[WIDTH][WIDTH]; /* last round: M diag(alpha^5, beta^5) */
static fe CAPACITY;         /* 2^64 in Montgomery form */
static fe MONT_ONE;         /* R mod p */
static int HAS_ADX = 0;

/* canonical integer (< p) -> Montgomery form, canonical */
static void fe_to_mont(fe *r, const u64 x[4]) {
    fe a, b;
    memcpy(a.v, x, sizeof a.v);
    memcpy(b.v, R2, sizeof R2);
    fe_mul(K_C, r, &a, &b);
    fe_canon(r);
}

/* Montgomery form -> canonical integer */
static void fe_from_mont(u64 out[4], const fe *a) {
    fe one = {{1, 0, 0, 0}}, r;
    fe_mul(K_C, &r, a, &one); /* a / R < 2p / R + p, so r <= p; canonical after one step */
    fe_canon(&r);
    memcpy(out, r.v, sizeof r.v);
}

static void fe_mul_canon(fe *r, const fe *a, const fe *b) {
    fe_mul(K_C, r, a, b);
    fe_canon(r);
}

static void fe_add_c(fe *r, const fe *a, const fe *b) { fe_add_canon(K_C, r, a, b); }

/* a^(p-2) = a^-1 */
static void fe_inv(fe *r, const fe *a) {
    u64 e[4];
    const u64 two[4] = {2, 0, 0, 0};
    sub4(e, P, two);
    fe acc = MONT_ONE;
    for (int i = 255; i >= 0; i--) {
        fe_mul(K_C, &acc, &acc, &acc);
        if ((e[i / 64] >> (i % 64)) & 1) fe_mul(K_C, &acc, &acc, a);
    }
    fe_canon(&acc);
    *r = acc;
}

/* Grain LFSR of the Poseidon reference implementation */
typedef struct {
    uint8_t bits[80];
    int pos; /* bit k of the 80-bit state lives in bits[(pos + k) % 80] */
} grain_t;

static int grain_step(grain_t *g) {
    const int p = g->pos;
    int nb = g->bits[(p + 62) % 80] ^ g->bits[(p + 51) % 80] ^ g->bits[(p + 38) % 80] ^
             g->bits[(p + 23) % 80] ^ g->bits[(p + 13) % 80] ^ g->bits[p];
    g->bits[p] = (uint8_t)nb; /* drop bit 0, append the new bit */
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

/* one output bit: from each pair (b1, b2), keep b2 when b1 == 1 */
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

static void derive_constants(void) {
    /* INV = -p^{-1} mod 2^64 by Newton iteration (each step doubles the correct bits) */
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
    {
        const u64 one[4] = {1, 0, 0, 0};
        const u64 cap[4] = {0, 1, 0, 0}; /* 2^64: the ConstantLength<1> capacity tag */
        fe_to_mont(&MONT_ONE, one);
        fe_to_mont(&CAPACITY, cap);
    }

    grain_t g;
    grain_init(&g, 1, 0, 254, WIDTH, FULL_ROUNDS, PARTIAL_ROUNDS);
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < WIDTH; i++) {
            u64 c[4];
            do {
                grain_bits(&g, c, 254);
            } while (!lt_p(c)); /* rejection sampling */
            fe_to_mont(&RC[r][i], c);
        }
    }
    /* MDS: Cauchy matrix 1 / (x_i + y_j) from 2t values reduced mod p, all distinct */
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
            fe_add_c(&s, &xi, &yj);
            fe_inv(&MDS[i][j], &s);
        }
    }

    /* Scaled rounds. The stored state s stands for the true state diag(alpha, beta) s, with
     * alpha = beta = 1 at the start of the permutation. Adding c to the true state is adding
     * k = (c0 / alpha, c1 / beta) to s, and the S-box turns the scales into alpha^5 and beta^5
     * (full round) or beta (partial round: cell 1 is untouched). The round's matrix times those
     * scales factors as diag(alpha', beta') [[1, v], [1, u]] with alpha' = m00 alpha^5,
     * beta' = m10 alpha^5, v = m01 beta_x / alpha', u = m11 beta_x / beta', so the stored
     * update is s0 = z0 + v z1, s1 = z0 + u z1 (z the S-box output): two multiplications
     * instead of four. The last round keeps the dense M diag(alpha^5, beta^5), so that the
     * permutation returns the true state. (All MDS entries are non-zero, so every scale is.) */
    {
        fe alpha = MONT_ONE, beta = MONT_ONE;
        for (int r = 0; r < ROUNDS; r++) {
            const int full = r < HALF_FULL || r >= HALF_FULL + PARTIAL_ROUNDS;
            fe ia, ib, a5 = alpha, bx = beta, na, nb, ina, inb, tmp;
            fe_inv(&ia, &alpha);
            fe_inv(&ib, &beta);
            fe_mul_canon(&SC_K[r][0], &RC[r][0], &ia);
            fe_mul_canon(&SC_K[r][1], &RC[r][1], &ib);
            fe_pow5(K_C, &a5);
            fe_canon(&a5);
            if (full) {
                fe_pow5(K_C, &bx);
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
}

/* ---------------------------------------------------------------------------------------- */
/* permutation                                                                               */

INLINE void full_round(int k, fe s[2], const fe c[2]) {
    fe n0, n1;
    fe_add(&s[0], &s[0], &c[0]);
    fe_add(&s[1], &s[1], &c[1]);
    fe_pow5(k, &s[0]);
    fe_pow5(k, &s[1]);
    fe_dot2(k, &n0, &s[0], &MDS[0][0], &s[1], &MDS[0][1]);
    fe_dot2(k, &n1, &s[0], &MDS[1][0], &s[1], &MDS[1][1]);
    s[0] = n0;
    s[1] = n1;
}

/* textbook halo2 permutation (reference for the self-test and for hash_plain) */
INLINE void permute_plain_body(int k, fe s[2]) {
    for (int r = 0; r < ROUNDS; r++) {
        if (r < HALF_FULL || r >= HALF_FULL + PARTIAL_ROUNDS) {
            full_round(k, s, RC[r]);
        } else {
            fe n0, n1;
            fe_add(&s[0], &s[0], &RC[r][0]);
            fe_add(&s[1], &s[1], &RC[r][1]);
            fe_pow5(k, &s[0]);
            fe_dot2(k, &n0, &s[0], &MDS[0][0], &s[1], &MDS[0][1]);
            fe_dot2(k, &n1, &s[0], &MDS[1][0], &s[1], &MDS[1][1]);
            s[0] = n0;
            s[1] = n1;
        }
    }
}

/* the permutation in the scaled form of derive_constants; x^5 and the matrix are fused:
 * s0 = x^4 * x + v * y with one reduction (fe_dot2), which needs x (and v y) canonical */
INLINE void permute_scaled_body(int k, fe s[2]) {
    for (int r = 0; r < ROUNDS - 1; r++) {
        fe x, y;
        fe_add_canon(k, &x, &s[0], &SC_K[r][0]);
        if (r < HALF_FULL || r >= HALF_FULL + PARTIAL_ROUNDS) {
            fe x2, x4, y2, y4, vy, uy;
            fe_add_canon(k, &y, &s[1], &SC_K[r][1]);
            fe_mul(k, &x2, &x, &x);
            fe_mul(k, &y2, &y, &y);
            fe_mul(k, &vy, &y, &SC_V[r]);
            fe_mul(k, &uy, &y, &SC_U[r]);
            fe_mul(k, &x4, &x2, &x2);
            fe_mul(k, &y4, &y2, &y2);
            fe_canon(&vy);
            fe_canon(&uy);
            fe_dot2(k, &s[0], &x4, &x, &y4, &vy);
            fe_dot2(k, &s[1], &x4, &x, &y4, &uy);
        } else {
            fe x2, x4;
            fe_add(&y, &s[1], &SC_K[r][1]);
            fe_mul(k, &x2, &x, &x);
            fe_mul(k, &x4, &x2, &x2);
            fe_dot2(k, &s[0], &x4, &x, &y, &SC_V[r]);
            fe_dot2(k, &s[1], &x4, &x, &y, &SC_U[r]);
        }
    }
    fe a, b;
    fe_add(&a, &s[0], &SC_K[ROUNDS - 1][0]);
    fe_add(&b, &s[1], &SC_K[ROUNDS - 1][1]);
    fe_pow5(k, &a);
    fe_pow5(k, &b);
    fe_dot2(k, &s[0], &a, &SC_LAST[0][0], &b, &SC_LAST[0][1]);
    fe_dot2(k, &s[1], &a, &SC_LAST[1][0], &b, &SC_LAST[1][1]);
}

typedef void (*permute_fn)(fe s[2]);

static __attribute__((noinline)) void permute_plain_c(fe s[2]) { permute_plain_body(K_C, s); }
static __attribute__((noinline)) void permute_scaled_c(fe s[2]) { permute_scaled_body(K_C, s); }
#if HAVE_ADX
static __attribute__((noinline)) void permute_scaled_adx(fe s[2]) { permute_scaled_body(K_ADX, s); }
#endif

/* int64 -> Montgomery form of (v mod p), in [0, 2p) */
INLINE void fe_from_i64(fe *r, int64_t v) {
    fe x, r2;
    if (v >= 0) {
        x.v[0] = (u64)v;
        x.v[1] = x.v[2] = x.v[3] = 0;
    } else {
        const u64 mag[4] = {(u64)0 - (u64)v, 0, 0, 0}; /* |v|, also for INT64_MIN */
        sub4(x.v, P, mag);
    }
    memcpy(r2.v, R2, sizeof R2);
    fe_mul(K_C, r, &x, &r2);
}

static void hash_i64(const int64_t *values, Py_ssize_t n, permute_fn permute, uint8_t out[32]) {
    fe s[2] = {{{0, 0, 0, 0}}, CAPACITY};
    for (Py_ssize_t i = 0; i < n; i++) {
        fe x;
        fe_from_i64(&x, values[i]);
        fe_add(&s[0], &s[0], &x);
        permute(s);
    }
    u64 h[4];
    fe_from_mont(h, &s[0]);
    for (int j = 0; j < 4; j++)
        for (int b = 0; b < 8; b++) out[8 * j + b] = (uint8_t)(h[j] >> (8 * b));
}

/* ---------------------------------------------------------------------------------------- */
/* Python binding                                                                            */

static permute_fn BEST = permute_scaled_c;

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

static PyObject *do_hash(PyObject *arg, permute_fn permute) {
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
    hash_i64((const int64_t *)view.buf, n, permute, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyObject *py_hash(PyObject *self, PyObject *arg) {
    (void)self;
    return do_hash(arg, BEST);
}

static PyObject *py_hash_portable(PyObject *self, PyObject *arg) {
    (void)self;
    return do_hash(arg, permute_scaled_c);
}

static PyObject *py_hash_plain(PyObject *self, PyObject *arg) {
    (void)self;
    return do_hash(arg, permute_plain_c);
}

static PyMethodDef methods[] = {
    {"hash", py_hash, METH_O,
     "hash(buffer) -> bytes\n\nEZKL Poseidon hash of a non-empty C-contiguous int64 buffer "
     "(each value taken mod p), as 32 little-endian bytes. Releases the GIL."},
    {"hash_portable", py_hash_portable, METH_O,
     "hash_portable(buffer) -> bytes\n\nSame as hash() with the portable C kernel forced."},
    {"hash_plain", py_hash_plain, METH_O,
     "hash_plain(buffer) -> bytes\n\nSame as hash() with the textbook (unoptimised) rounds "
     "and the portable C kernel; for cross-checks and benchmarks."},
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

static int self_test(permute_fn permute) {
    const int64_t one = 1;
    const int64_t probe[6] = {0, -1, INT64_MIN, INT64_MAX, 123456789, -(INT64_C(1) << 62)};
    uint8_t h[32], ref[32];
    hash_i64(&one, 1, permute, h);
    if (memcmp(h, KAT_ONE, 32) != 0) return 0;
    hash_i64(probe, 6, permute, h);
    hash_i64(probe, 6, permute_plain_c, ref);
    return memcmp(h, ref, 32) == 0;
}

static int READY = 0;

PyMODINIT_FUNC PyInit__poseidon(void) {
    if (!READY) {
        derive_constants();
        if (!self_test(permute_scaled_c)) {
            PyErr_SetString(PyExc_ImportError,
                            "refute._poseidon: self-test failed (hash differs from EZKL's)");
            return NULL;
        }
#if HAVE_ADX
        HAS_ADX = cpu_has_adx();
        if (HAS_ADX) {
            if (!self_test(permute_scaled_adx)) {
                PyErr_SetString(PyExc_ImportError,
                                "refute._poseidon: self-test of the ADX kernel failed");
                return NULL;
            }
            BEST = permute_scaled_adx;
        }
#endif
        READY = 1;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "KERNEL", HAS_ADX ? "x86-64 mulx/adx" : "portable C") <
        0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
