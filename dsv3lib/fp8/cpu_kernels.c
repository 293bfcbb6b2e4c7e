/* The CPU fast path of FP8 training's elementwise work (chapter 1): dsv3lib/fp8/cpu_kernels.py builds this file
 * with the system C compiler on first use and calls it through ctypes. Each function does in one or two passes
 * what its PyTorch reference in dsv3lib/fp8/grid.py and quant.py does in about ten tensor ops, with the same
 * IEEE operations in the same order: FP32 division, the E4M3 rounding of round_to_e4m3_ (FP32 add and subtract
 * of a magic number), multiplications and additions as written. Built without -ffast-math and with
 * -ffp-contract=off, so the compiler may neither reassociate nor fuse them (tests/test_fp8_cpu_kernels.py holds
 * every function to its reference bit for bit).
 *
 * All matrices are row-major and contiguous; sizes are int64. The quantisers return a status: bit 0 set if the
 * input held NaN or inf (the caller then raises, naming the tensor), bit 1 if a scale came out subnormal (an amax
 * below ~5e-36: x / s may then pass 464, where only torch's cast knows what to do, so the caller runs the
 * reference instead), else 0.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FP8_MAX 448.0f
#define ABS_MASK 0x7FFFFFFFu
#define INF_BITS 0x7F800000u /* |x| bits at or above it: inf or NaN */
#define FLOOR_BITS (121u << 23) /* 2^-6, E4M3's smallest normal: below it the grid step stays 2^-9 */

/* round_to_e4m3_ for one value |v| <= 464: v + M - M with M = 1.5 * 2^20 * 2^max(e, -6) (exact product). */
static inline float rnd(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    uint32_t e = b & INF_BITS;
    e = e < FLOOR_BITS ? FLOOR_BITS : e;
    float p;
    memcpy(&p, &e, 4);
    float m = p * 1572864.0f;
    return (v + m) - m;
}

/* The scale of a group from the bits of its largest |x| (max over |x| bits = max over |x| for non-NaN). */
static inline float scale_of(uint32_t amax_bits, int *status) {
    if (amax_bits >= INF_BITS) {
        *status |= 1;
        return 1.0f;
    }
    float amax;
    memcpy(&amax, &amax_bits, 4);
    const float s = amax > 0.0f ? amax / FP8_MAX : 1.0f;
    if (s < FLT_MIN) *status |= 2;
    return s;
}

/* x (M, K): 1 x bs tiles along K (act_quant_ref). v (M, K) the E4M3 values, s (M, ceil(K/bs)). */
int act_tiles(const float *x, float *v, float *s, int64_t M, int64_t K, int64_t bs) {
    const int64_t nk = (K + bs - 1) / bs;
    int status = 0;
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * K;
        float *vr = v + m * K;
        for (int64_t t = 0; t < nk; t++) {
            const int64_t k0 = t * bs, k1 = k0 + bs < K ? k0 + bs : K;
            uint32_t mb = 0;
            for (int64_t k = k0; k < k1; k++) {
                uint32_t a;
                memcpy(&a, xr + k, 4);
                a &= ABS_MASK;
                mb = a > mb ? a : mb;
            }
            const float sc = scale_of(mb, &status);
            s[m * nk + t] = sc;
            for (int64_t k = k0; k < k1; k++) vr[k] = rnd(xr[k] / sc);
        }
    }
    return status;
}

/* w (B, N, K), B matrices: bs x bs blocks of each (weight_quant_ref), none straddling two matrices.
 * v (B, N, K), s (B, ceil(N/bs), ceil(K/bs)). */
int weight_blocks(const float *w, float *v, float *s, int64_t B, int64_t N, int64_t K, int64_t bs) {
    const int64_t nn = (N + bs - 1) / bs, nk = (K + bs - 1) / bs;
    int status = 0;
    for (int64_t b = 0; b < B; b++) {
        const float *wm = w + b * N * K;
        float *vm = v + b * N * K;
        float *sm = s + b * nn * nk;
        for (int64_t i = 0; i < nn; i++) {
            const int64_t n0 = i * bs, n1 = n0 + bs < N ? n0 + bs : N;
            for (int64_t t = 0; t < nk; t++) {
                const int64_t k0 = t * bs, k1 = k0 + bs < K ? k0 + bs : K;
                uint32_t mb = 0;
                for (int64_t n = n0; n < n1; n++) {
                    for (int64_t k = k0; k < k1; k++) {
                        uint32_t a;
                        memcpy(&a, wm + n * K + k, 4);
                        a &= ABS_MASK;
                        mb = a > mb ? a : mb;
                    }
                }
                const float sc = scale_of(mb, &status);
                sm[i * nk + t] = sc;
                for (int64_t n = n0; n < n1; n++)
                    for (int64_t k = k0; k < k1; k++) vm[n * K + k] = rnd(wm[n * K + k] / sc);
            }
        }
    }
    return status;
}

/* a (Mp, C), Mp a multiple of bs: each column's bs x 1 tiles along the rows (act_quant_ref of the transposed
 * matrix), values written in a's own layout: v (Mp, C), s (Mp / bs, C). */
int token_tiles(const float *a, float *v, float *s, int64_t Mp, int64_t C, int64_t bs) {
    const int64_t T = Mp / bs;
    int status = 0;
    for (int64_t t = 0; t < T; t++) {
        const float *at = a + t * bs * C;
        float *vt = v + t * bs * C;
        uint32_t *mb = (uint32_t *)(s + t * C); /* each column's running max of |x| bits, then its scale */
        for (int64_t c = 0; c < C; c++) mb[c] = 0;
        for (int64_t r = 0; r < bs; r++) {
            const float *row = at + r * C;
            for (int64_t c = 0; c < C; c++) {
                uint32_t x;
                memcpy(&x, row + c, 4);
                x &= ABS_MASK;
                mb[c] = x > mb[c] ? x : mb[c];
            }
        }
        float *st = s + t * C;
        for (int64_t c = 0; c < C; c++) st[c] = scale_of(mb[c], &status);
        for (int64_t r = 0; r < bs; r++)
            for (int64_t c = 0; c < C; c++) vt[r * C + c] = rnd(at[r * C + c] / st[c]);
    }
    return status;
}

/* One K block of the block-scaled GEMM into its FP32 accumulator (quant.gemm_blocks):
 * acc[m, n] = (first ? +0 : acc[m, n]) + (part[m, n] * sa[m]) * sb[m, n]; sa[m] at sa + m * sa_rs,
 * sb[m, n] at sb + m * sb_rs + n * sb_cs. acc may be part itself. */
void scale_acc(const float *part, const float *sa, int64_t sa_rs, const float *sb, int64_t sb_rs, int64_t sb_cs,
               float *acc, int64_t M, int64_t N, int first) {
    for (int64_t m = 0; m < M; m++) {
        const float *pr = part + m * N;
        float *ar = acc + m * N;
        const float am = sa[m * sa_rs];
        const float *sr = sb + m * sb_rs;
        if (first) {
            if (sb_cs == 1)
                for (int64_t n = 0; n < N; n++) ar[n] = (pr[n] * am) * sr[n] + 0.0f;
            else
                for (int64_t n = 0; n < N; n++) ar[n] = (pr[n] * am) * sr[n * sb_cs] + 0.0f;
        } else {
            if (sb_cs == 1)
                for (int64_t n = 0; n < N; n++) ar[n] = ar[n] + (pr[n] * am) * sr[n];
            else
                for (int64_t n = 0; n < N; n++) ar[n] = ar[n] + (pr[n] * am) * sr[n * sb_cs];
        }
    }
}

/* Wgrad's tiles summed (quant.tile_products' two scale multiplies, then quant.sum_tiles): parts (T, n, K),
 * ds (T, n) and xs (T, K) contiguous; acc (n, K) = sum over t in order, from +0, of (parts[t] * ds[t]) * xs[t]. */
void tile_sum(const float *parts, const float *ds, const float *xs, float *acc, int64_t T, int64_t n, int64_t K) {
    for (int64_t t = 0; t < T; t++) {
        const float *pt = parts + t * n * K, *dt = ds + t * n, *xt = xs + t * K;
        for (int64_t i = 0; i < n; i++) {
            const float *pr = pt + i * K;
            float *ar = acc + i * K;
            const float d = dt[i];
            if (t == 0)
                for (int64_t k = 0; k < K; k++) ar[k] = (pr[k] * d) * xt[k] + 0.0f;
            else
                for (int64_t k = 0; k < K; k++) ar[k] = ar[k] + (pr[k] * d) * xt[k];
        }
    }
}
