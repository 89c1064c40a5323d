/* One pass over a row block of the fuse: product, merge, guard, cast, exact-unfuse codes.
 *
 * The engine (safemerge/merge/engine.py) needs, per element of a row block of the weight
 * W: the rank-r product P = left @ right in float32, the merged value cast(float(W) + P),
 * whether it is finite, the unfused value cast(float(fused) - P), and the 2-bit correction
 * code of bits(W) - bits(unfused). With torch ops that is a matmul and five more passes
 * over the block, several of them mixed-dtype (unvectorised in torch); here it is one
 * vectorised pass that keeps P in registers and L1, plus a pack of the codes.
 *
 * Every result is the same, bit for bit, as the torch code in engine.py, correction.py and
 * kernel.rank_product, which stays as the reference and the fallback (the tests run both
 * and compare): P is computed in one fixed order, left[i, 0] * right[0, j] and then
 * + left[i, k] * right[k, j] for k = 1, 2, ..., every product and sum rounded on its own
 * (the build passes -ffp-contract=off: no fused multiply-add), and IEEE single additions,
 * subtractions and round-to-nearest-even casts are exactly specified.
 *
 * Layout: left is rows x rank and right rank x cols, float32, contiguous; rows of W and of
 * the output may be strided (a row stride in elements, columns contiguous). Codes are in
 * the block's flat row-major order, four to a byte, first code in the low bits (as
 * correction.py packs them): 0 same bits, 1 one step up, 3 one step down, 2 escape (the
 * original bits are kept whole, in order).
 *
 * The entry points release the GIL: the engine runs blocks on several threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KIND_FLOAT32 = 0, KIND_FLOAT16 = 1, KIND_BFLOAT16 = 2 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* One clone for AVX2 + F16C machines (8 floats a vector, hardware half casts), one for any
 * x86-64; the loader picks at start-up. */
#define SM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SM_CLONES
#endif

/* Helpers are always inlined, so that they are compiled for the clone that calls them. */
#define SM_INLINE static inline __attribute__((always_inline))

#if defined(__FLT16_MAX__)
#define SM_HAS_FLOAT16 1
#else
#define SM_HAS_FLOAT16 0
#endif

SM_INLINE float bits_to_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

SM_INLINE uint32_t float_to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* float32 "bits" are handled as uint32 throughout (its cast is the identity). */
SM_INLINE float f32_value(uint32_t bits) { return bits_to_float(bits); }
SM_INLINE int f32_bad(uint32_t bits) { return (bits & 0x7F800000u) == 0x7F800000u; }

SM_INLINE float bf16_value(uint16_t bits) { return bits_to_float((uint32_t)bits << 16); }

/* Round to nearest, ties to even, as torch's cast does; NaN becomes the quiet NaN 0x7FC0
 * (the rounding add could otherwise carry a NaN's payload into the sign bit). */
SM_INLINE uint16_t bf16_bits(float value) {
    uint32_t bits = float_to_bits(value);
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return value != value ? (uint16_t)0x7FC0 : (uint16_t)rounded;
}

SM_INLINE int bf16_bad(uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u; }

#if SM_HAS_FLOAT16
SM_INLINE float f16_value(uint16_t bits) {
    _Float16 half;
    memcpy(&half, &bits, sizeof half);
    return (float)half;
}

SM_INLINE uint16_t f16_bits(float value) {
    _Float16 half = (_Float16)value;
    uint16_t bits;
    memcpy(&bits, &half, sizeof bits);
    return bits;
}
#endif

SM_INLINE int f16_bad(uint16_t bits) { return (bits & 0x7C00u) == 0x7C00u; }

/* bits(original) - bits(unfused), modulo 2**width, read as signed. */
SM_INLINE int32_t diff32(uint32_t a, uint32_t b) { return (int32_t)(a - b); }
SM_INLINE int32_t diff16(uint16_t a, uint16_t b) { return (int16_t)(uint16_t)(a - b); }

/* clamp(d, -2, 2) mod 4: 0 -> 0, +1 -> 1, -1 -> 3, two or more steps either way -> 2. */
SM_INLINE uint8_t code_of(int32_t difference) {
    int32_t clamped = difference < -2 ? -2 : (difference > 2 ? 2 : difference);
    return (uint8_t)(clamped & 3);
}

/* A code's step back to the original bits: the escape's is 0 (its bits are replaced). */
SM_INLINE int32_t step_of(uint8_t code) { return code == 1 ? 1 : (code == 3 ? -1 : 0); }

/* ------------------------------------------------------------------- the rank-r product */

/* Eight floats as one value: GCC lowers the arithmetic to the clone's vector width (AVX
 * for the x86-64-v3 clone, SSE pairs otherwise), lane by lane, the same IEEE operations. */
typedef float float8 __attribute__((vector_size(32)));

/* A tile is eight vectors: eight independent chains of additions, in registers across
 * the r steps, hide the adder's latency. */
#define TILE 64
/* Columns of one row whose product is made before the elementwise pass runs over them:
 * the product waits in L1 (2 KiB) and the pass is one long vectorised loop. */
#define SEGMENT 512

SM_INLINE float8 load8(const float *source) {
    float8 value;
    memcpy(&value, source, sizeof value);
    return value;
}

/* The order of k: 0, 1, ..., r - 1 for the fuse (``reverse`` 0), r - 1, ..., 0 for the bound
 * screen (``reverse`` 1). Every caller passes a constant, so each order compiles to its own
 * straight loop. */
SM_INLINE Py_ssize_t k_at(Py_ssize_t s, Py_ssize_t rank, int reverse) {
    return reverse ? rank - 1 - s : s;
}

/* A vector times a scalar: GCC broadcasts the scalar with one instruction (an explicit
 * {l, l, ...} vector literal costs nine). Multiplication commutes exactly in IEEE. */
SM_INLINE void product_tile(const float *restrict left, const float *restrict right,
                            Py_ssize_t cols, Py_ssize_t rank, float *restrict acc, int reverse) {
    float8 a[TILE / 8];
    const Py_ssize_t first = k_at(0, rank, reverse);
    const float l0 = left[first];
    for (int v = 0; v < TILE / 8; v++) a[v] = load8(right + first * cols + 8 * v) * l0;
    for (Py_ssize_t s = 1; s < rank; s++) {
        const Py_ssize_t k = k_at(s, rank, reverse);
        const float *r = right + k * cols;
        const float lk = left[k];
        for (int v = 0; v < TILE / 8; v++) a[v] = a[v] + load8(r + 8 * v) * lk;
    }
    for (int v = 0; v < TILE / 8; v++) memcpy(acc + 8 * v, &a[v], sizeof a[v]);
}

/* The product of ``n`` columns of one row, from column ``j0``, into ``acc``. */
SM_INLINE void product_segment(const float *restrict left, const float *restrict right,
                               Py_ssize_t cols, Py_ssize_t rank, Py_ssize_t j0, Py_ssize_t n,
                               float *restrict acc, int reverse) {
    Py_ssize_t t = 0;
    for (; t + TILE <= n; t += TILE)
        product_tile(left, right + j0 + t, cols, rank, acc + t, reverse);
    if (t == n) return;
    const Py_ssize_t first = k_at(0, rank, reverse);
    for (Py_ssize_t u = t; u < n; u++) acc[u] = left[first] * right[first * cols + j0 + u];
    for (Py_ssize_t s = 1; s < rank; s++) {
        const Py_ssize_t k = k_at(s, rank, reverse);
        const float l = left[k];
        const float *r = right + k * cols + j0;
        for (Py_ssize_t u = t; u < n; u++) acc[u] = acc[u] + l * r[u];
    }
}

/* Two rows at once: each vector of ``right`` is loaded once for both (the loads, not
 * the arithmetic, were most of the instructions). Half a tile a row keeps the eight
 * accumulators in registers. Each row's numbers are exactly product_segment's. */
SM_INLINE void product_tile2(const float *restrict left0, const float *restrict left1,
                             const float *restrict right, Py_ssize_t cols, Py_ssize_t rank,
                             float *restrict acc0, float *restrict acc1, int reverse) {
    float8 a[TILE / 16], b[TILE / 16];
    const Py_ssize_t first = k_at(0, rank, reverse);
    const float l0 = left0[first], m0 = left1[first];
    for (int v = 0; v < TILE / 16; v++) {
        const float8 r = load8(right + first * cols + 8 * v);
        a[v] = r * l0;
        b[v] = r * m0;
    }
    for (Py_ssize_t s = 1; s < rank; s++) {
        const Py_ssize_t k = k_at(s, rank, reverse);
        const float *row = right + k * cols;
        const float lk = left0[k], mk = left1[k];
        for (int v = 0; v < TILE / 16; v++) {
            const float8 r = load8(row + 8 * v);
            a[v] = a[v] + r * lk;
            b[v] = b[v] + r * mk;
        }
    }
    for (int v = 0; v < TILE / 16; v++) {
        memcpy(acc0 + 8 * v, &a[v], sizeof a[v]);
        memcpy(acc1 + 8 * v, &b[v], sizeof b[v]);
    }
}

SM_INLINE void product_segment2(const float *restrict left0, const float *restrict left1,
                                const float *restrict right, Py_ssize_t cols, Py_ssize_t rank,
                                Py_ssize_t j0, Py_ssize_t n, float *restrict acc0,
                                float *restrict acc1, int reverse) {
    Py_ssize_t t = 0;
    for (; t + TILE / 2 <= n; t += TILE / 2)
        product_tile2(left0, left1, right + j0 + t, cols, rank, acc0 + t, acc1 + t, reverse);
    if (t == n) return;
    const Py_ssize_t first = k_at(0, rank, reverse);
    for (Py_ssize_t u = t; u < n; u++) {
        acc0[u] = left0[first] * right[first * cols + j0 + u];
        acc1[u] = left1[first] * right[first * cols + j0 + u];
    }
    for (Py_ssize_t s = 1; s < rank; s++) {
        const Py_ssize_t k = k_at(s, rank, reverse);
        const float l = left0[k], m = left1[k];
        const float *r = right + k * cols + j0;
        for (Py_ssize_t u = t; u < n; u++) {
            acc0[u] = acc0[u] + l * r[u];
            acc1[u] = acc1[u] + m * r[u];
        }
    }
}

/* The products of rows ``i`` and ``i + 1`` (when ``pair``), columns ``j0`` to ``j0 + n``. */
SM_INLINE void product_rows(const float *restrict left, const float *restrict right,
                            Py_ssize_t cols, Py_ssize_t rank, Py_ssize_t i, int pair,
                            Py_ssize_t j0, Py_ssize_t n, float product[2][SEGMENT],
                            int reverse) {
    if (pair)
        product_segment2(left + i * rank, left + (i + 1) * rank, right, cols, rank, j0, n,
                         product[0], product[1], reverse);
    else
        product_segment(left + i * rank, right, cols, rank, j0, n, product[0], reverse);
}

/* ---------------------------------------------------------------- the per-element loops
 * Each returns 1 when some fused (or, unfusing without codes, unfused) element is not
 * finite in the dtype, else 0. ``codes`` (a byte per element, flat) is NULL when no
 * correction is made or applied.
 */

/* The body of a block's loop: the rows in pairs (two rows share each load of ``right``),
 * each row's product a segment of columns at a time, then ``NAME##_segment`` over that
 * segment of SOURCE (row stride SOURCE_STRIDE), ``out`` and ``codes``. The function it
 * expands in names its arguments left, right, rank, rows, cols, out, out_stride, codes. */
#define SM_ROW_SEGMENTS(NAME, SOURCE, SOURCE_STRIDE)                                         \
        int bad = 0;                                                                         \
        float product[2][SEGMENT];                                                           \
        for (Py_ssize_t i = 0; i < rows; i += 2) {                                           \
            const int pair = i + 1 < rows;                                                   \
            for (Py_ssize_t j0 = 0; j0 < cols; j0 += SEGMENT) {                              \
                Py_ssize_t n = cols - j0 < SEGMENT ? cols - j0 : SEGMENT;                    \
                product_rows(left, right, cols, rank, i, pair, j0, n, product, 0);           \
                for (int h = 0; h <= pair; h++) {                                            \
                    Py_ssize_t row = i + h;                                                  \
                    bad |= NAME##_segment(SOURCE + row * SOURCE_STRIDE + j0, product[h], n,  \
                                          out + row * out_stride + j0,                       \
                                          codes == NULL ? NULL : codes + row * cols + j0);   \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        return bad;

#define SM_FUSE_LOOP(NAME, TYPE, TO_FLOAT, FROM_FLOAT, IS_BAD, DIFF)                         \
    SM_INLINE int NAME##_segment(const TYPE *restrict w, const float *restrict p,            \
                                 Py_ssize_t n, TYPE *restrict o, uint8_t *restrict c) {      \
        int bad = 0;                                                                         \
        if (c == NULL) {                                                                     \
            for (Py_ssize_t t = 0; t < n; t++) {                                             \
                TYPE fused = FROM_FLOAT(TO_FLOAT(w[t]) + p[t]);                              \
                o[t] = fused;                                                                \
                bad |= IS_BAD(fused);                                                        \
            }                                                                                \
            return bad;                                                                      \
        }                                                                                    \
        for (Py_ssize_t t = 0; t < n; t++) {                                                 \
            TYPE original = w[t];                                                            \
            TYPE fused = FROM_FLOAT(TO_FLOAT(original) + p[t]);                              \
            TYPE unfused = FROM_FLOAT(TO_FLOAT(fused) - p[t]);                               \
            o[t] = fused;                                                                    \
            bad |= IS_BAD(fused);                                                            \
            c[t] = code_of(DIFF(original, unfused));                                         \
        }                                                                                    \
        return bad;                                                                          \
    }                                                                                        \
    SM_CLONES static int NAME(const TYPE *weight, Py_ssize_t weight_stride, const float *left, \
                              const float *right, Py_ssize_t rank, Py_ssize_t rows,          \
                              Py_ssize_t cols, TYPE *out, Py_ssize_t out_stride,             \
                              uint8_t *codes) {                                              \
        SM_ROW_SEGMENTS(NAME, weight, weight_stride)                                         \
    }

#define SM_UNFUSE_LOOP(NAME, TYPE, TO_FLOAT, FROM_FLOAT, IS_BAD)                             \
    SM_INLINE int NAME##_segment(const TYPE *f, const float *restrict p, Py_ssize_t n,       \
                                 TYPE *o, const uint8_t *restrict c) {                       \
        /* f and o may be the same memory (an in-place unfuse): each element is read   */    \
        /* before it is written, at the same index.                                    */    \
        int bad = 0;                                                                         \
        if (c == NULL) {                                                                     \
            for (Py_ssize_t t = 0; t < n; t++) {                                             \
                TYPE unfused = FROM_FLOAT(TO_FLOAT(f[t]) - p[t]);                            \
                o[t] = unfused;                                                              \
                bad |= IS_BAD(unfused);                                                      \
            }                                                                                \
            return bad;                                                                      \
        }                                                                                    \
        for (Py_ssize_t t = 0; t < n; t++) {                                                 \
            TYPE unfused = FROM_FLOAT(TO_FLOAT(f[t]) - p[t]);                                \
            o[t] = (TYPE)(unfused + (TYPE)step_of(c[t]));                                    \
        }                                                                                    \
        return bad;                                                                          \
    }                                                                                        \
    SM_CLONES static int NAME(const TYPE *fused, Py_ssize_t fused_stride, const float *left, \
                              const float *right, Py_ssize_t rank, Py_ssize_t rows,          \
                              Py_ssize_t cols, TYPE *out, Py_ssize_t out_stride,             \
                              const uint8_t *codes) {                                        \
        SM_ROW_SEGMENTS(NAME, fused, fused_stride)                                           \
    }

SM_FUSE_LOOP(fuse_f32, uint32_t, f32_value, float_to_bits, f32_bad, diff32)
SM_FUSE_LOOP(fuse_bf16, uint16_t, bf16_value, bf16_bits, bf16_bad, diff16)
SM_UNFUSE_LOOP(unfuse_f32, uint32_t, f32_value, float_to_bits, f32_bad)
SM_UNFUSE_LOOP(unfuse_bf16, uint16_t, bf16_value, bf16_bits, bf16_bad)
#if SM_HAS_FLOAT16
SM_FUSE_LOOP(fuse_f16, uint16_t, f16_value, f16_bits, f16_bad, diff16)
SM_UNFUSE_LOOP(unfuse_f16, uint16_t, f16_value, f16_bits, f16_bad)
#endif

/* ------------------------------------------------------------------ the bound check
 * For safemerge.merge.bound_check (its _Screen docstring has the proof): per element,
 * Y = W + P' in float32, where P' is the rank-r product computed independently of the
 * fuse's (k from last to first: another order of the same recursive sum, so the bound's
 * gamma covers it, and a systematic slip in one order shows as |Y - F|), then
 * q = (|Y - F| + a_r * b_c) / p, p = Y's exponent bits (at least ``floor``). An element
 * whose q is not below ``threshold`` (NaN included) is a candidate: its index is listed,
 * or its ratio computed in float64 on the spot (larger_ratio), or both.
 */

/* What the float64 ratio of an element needs (bound_check._Exact's factors): the
 * reference W + sum_k left[i, k] right[k, j] and the bound gamma |W| + sum_k
 * alpha[i, k] |right[k, j]| + underflow[j], plus half an ulp of the dtype at
 * |reference| + that. ``right`` comes transposed, so an element's column is contiguous. */
typedef struct {
    const double *left;      /* rows x rank, the coefficients folded in */
    const double *right_t;   /* cols x rank */
    const double *alpha;     /* rows x alpha_stride, the first rank columns used */
    Py_ssize_t alpha_stride;
    const double *underflow; /* cols */
    double gamma;
    double smallest_normal;  /* the dtype's */
    int mantissa;            /* the dtype's explicit mantissa bits */
} exact_terms;

/* A candidate: listed (when ``found``), counted, and its ratio taken (when ``exact``). */
typedef struct {
    const exact_terms *exact;
    int64_t *found;
    Py_ssize_t room, count;
    double worst;
} candidates;

SM_INLINE double double_of_bits(uint64_t bits) {
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

SM_INLINE uint64_t bits_of_double(double value) {
    uint64_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

typedef double double4 __attribute__((vector_size(32)));

SM_INLINE double4 load4(const double *source) {
    double4 value;
    memcpy(&value, source, sizeof value);
    return value;
}

typedef int64_t int64x4 __attribute__((vector_size(32)));

/* |value|, lane by lane: the sign bits cleared (a vector cast keeps the bits). */
SM_INLINE double4 abs4(double4 value) {
    const int64x4 magnitude_bits = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    return (double4)((int64x4)value & magnitude_bits);
}

/* The larger of ``worst`` and element (i, j)'s ratio |fused - reference| / bound, in
 * float64; infinity where the ratio is NaN. The sums run in another order than _Exact's
 * matmuls (four interleaved partial sums): the ratios agree up to float64 rounding, which
 * the screen's threshold allows for. The division is made only for a ratio that may
 * exceed ``worst`` (a candidate is rarely the largest so far). */
SM_INLINE double larger_ratio(const exact_terms *e, Py_ssize_t i, Py_ssize_t j, Py_ssize_t rank,
                              double weight, double fused, double worst) {
    const double *left = e->left + i * rank, *alpha = e->alpha + i * e->alpha_stride;
    const double *right = e->right_t + j * rank;
    /* Four partial sums, one vector: lane s adds the terms k = 4q + s, the rest go to lane 0. */
    double4 p = {0.0, 0.0, 0.0, 0.0}, b = {0.0, 0.0, 0.0, 0.0};
    Py_ssize_t k = 0;
    for (; k + 4 <= rank; k += 4) {
        const double4 r = load4(right + k);
        p = p + load4(left + k) * r;
        b = b + load4(alpha + k) * abs4(r);
    }
    for (; k < rank; k++) {
        p[0] += left[k] * right[k];
        b[0] += alpha[k] * fabs(right[k]);
    }
    const double p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
    const double b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
    const double reference = weight + ((p0 + p1) + (p2 + p3));
    double bound = e->gamma * fabs(weight) + ((b0 + b1) + (b2 + b3)) + e->underflow[j];
    double magnitude = fabs(reference) + bound;
    magnitude = magnitude < e->smallest_normal ? e->smallest_normal : magnitude;
    /* Half the dtype's spacing at magnitude: its binade's power of two, times 2**-(m+1). */
    const uint64_t exponent = bits_of_double(magnitude) >> 52;
    bound += double_of_bits((exponent - (uint64_t)(e->mantissa + 1)) << 52);
    const double error = fabs(fused - reference);
    if (error <= worst * bound) return worst; /* NaN goes on */
    const double ratio = error / bound;
    if (ratio != ratio) return (double)INFINITY;
    return ratio > worst ? ratio : worst;
}

/* The screen's p is at most 2**126 (bound_check._Screen: for |Y| >= 2**127 it is then
 * below Y's binade, which only raises q), so that its inverse is a normal float32. */
#define SM_LARGEST_POWER 0x7E800000u

/* 1 / p for p = 2**(E - 127) a float32 power of two with E from 1 to 253, as bits: the
 * biased exponent of 2**(127 - E) is 254 - E. x * (1 / p) and x / p round the same exact
 * value, so they are the same float. */
SM_INLINE uint32_t inverse_power(uint32_t power) { return 0x7F000000u - power; }

/* a'_r, the screen's factor of row r: w a_r rounded up past float64's rounding and
 * float32's, also where it is subnormal; bound_check._Screen._row_scale, the same
 * operations in the same order. */
SM_INLINE float row_factor(double row_sum, double weight) {
    return (float)((row_sum * weight) * (1.0 + 0x1p-20) + 0x1p-149);
}

typedef int int8v __attribute__((vector_size(32)));

/* Whether all eight q from ``q`` are below ``threshold`` (NaN is not below anything). */
SM_INLINE int all_below(const float *q, float threshold) {
    const int8v below = load8(q) < threshold;
    uint64_t lanes[4];
    memcpy(lanes, &below, sizeof lanes);
    return (lanes[0] & lanes[1] & lanes[2] & lanes[3]) == ~(uint64_t)0;
}

#define SM_SCREEN_LOOP(NAME, TYPE, TO_FLOAT)                                                 \
    SM_INLINE void NAME##_segment(const TYPE *restrict w, const TYPE *restrict f,            \
                                  const float *restrict p, float a, const float *restrict b, \
                                  uint32_t floor, Py_ssize_t n, float *restrict q) {         \
        for (Py_ssize_t t = 0; t < n; t++) {                                                 \
            float y = TO_FLOAT(w[t]) + p[t];                                                 \
            uint32_t power = float_to_bits(y) & 0x7F800000u;                                 \
            power = power < floor ? floor : power;                                           \
            power = power > SM_LARGEST_POWER ? SM_LARGEST_POWER : power;                     \
            float magnitude = fabsf(y - TO_FLOAT(f[t]));                                     \
            q[t] = (magnitude + a * b[t]) * bits_to_float(inverse_power(power));             \
        }                                                                                    \
    }                                                                                        \
    /* The candidates among q[0:n] (row i, columns j0...): 1 when the list is full. Their  */ \
    /* offsets are gathered first (without a branch per element), then taken in one loop,  */ \
    /* whose float64 work overlaps from one candidate to the next.                         */ \
    SM_INLINE int NAME##_candidates(const TYPE *w, const TYPE *f, const float *q,            \
                                    float threshold, Py_ssize_t i, Py_ssize_t j0,            \
                                    Py_ssize_t n, Py_ssize_t rank, Py_ssize_t cols,          \
                                    candidates *c) {                                         \
        uint16_t offsets[SEGMENT];                                                           \
        Py_ssize_t m = 0;                                                                    \
        for (Py_ssize_t t = 0; t < n; t += 8) {                                              \
            if (t + 8 <= n && all_below(q + t, threshold)) continue;                         \
            for (Py_ssize_t u = t; u < t + 8 && u < n; u++) {                                \
                offsets[m] = (uint16_t)u;                                                    \
                m += !(q[u] < threshold);                                                    \
            }                                                                                \
        }                                                                                    \
        if (c->found != NULL) {                                                              \
            if (c->count + m > c->room) return 1;                                            \
            for (Py_ssize_t x = 0; x < m; x++)                                               \
                c->found[c->count + x] = i * cols + j0 + offsets[x];                         \
        }                                                                                    \
        c->count += m;                                                                       \
        if (c->exact == NULL) return 0;                                                      \
        double worst = c->worst;                                                             \
        for (Py_ssize_t x = 0; x < m; x++) {                                                 \
            const Py_ssize_t u = offsets[x];                                                 \
            worst = larger_ratio(c->exact, i, j0 + u, rank, TO_FLOAT(w[u]), TO_FLOAT(f[u]),  \
                                 worst);                                                     \
        }                                                                                    \
        c->worst = worst;                                                                    \
        return 0;                                                                            \
    }                                                                                        \
    SM_CLONES static int NAME(const TYPE *weight, Py_ssize_t weight_stride,                  \
                              const TYPE *fused, Py_ssize_t fused_stride,                    \
                              const float *left, const float *right, Py_ssize_t rank,        \
                              Py_ssize_t rows, Py_ssize_t cols, const double *row_sums,      \
                              double row_weight, const float *column_scale, uint32_t floor,  \
                              float threshold, candidates *c) {                              \
        float product[2][SEGMENT], q[SEGMENT];                                               \
        for (Py_ssize_t i = 0; i < rows; i += 2) {                                           \
            const int pair = i + 1 < rows;                                                   \
            for (Py_ssize_t j0 = 0; j0 < cols; j0 += SEGMENT) {                              \
                Py_ssize_t n = cols - j0 < SEGMENT ? cols - j0 : SEGMENT;                    \
                product_rows(left, right, cols, rank, i, pair, j0, n, product, 1);           \
                for (int h = 0; h <= pair; h++) {                                            \
                    const TYPE *w = weight + (i + h) * weight_stride + j0;                   \
                    const TYPE *f = fused + (i + h) * fused_stride + j0;                     \
                    NAME##_segment(w, f, product[h], row_factor(row_sums[i + h], row_weight), \
                                   column_scale + j0, floor, n, q);                          \
                    if (NAME##_candidates(w, f, q, threshold, i + h, j0, n, rank, cols, c))  \
                        return 1;                                                            \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        return 0;                                                                            \
    }

SM_SCREEN_LOOP(screen_bf16, uint16_t, bf16_value)
#if SM_HAS_FLOAT16
SM_SCREEN_LOOP(screen_f16, uint16_t, f16_value)
#endif

/* ------------------------------------------------------------- the 4-bit quantizer
 * For safemerge.quant.quantize4 (its docstring has the method): per block of ``blocksize``
 * float32 values y, x = clamp(y * reciprocal, -1, 1), its cell (int)((x + 1) * cells / 2),
 * index = 2 * cell + (x > midpoint[cell]), then the code table[index] and the value
 * value_table[index] * scale. The same float32 operations, in the same order, as the
 * torch ops of quantize4._lookup, so the same codes and values bit for bit.
 */
SM_CLONES static void lookup_4bit(const float *restrict source, Py_ssize_t blocks,
                                  Py_ssize_t blocksize, const float *restrict reciprocal,
                                  const float *restrict scales, float half_cells,
                                  const float *restrict midpoint, const uint8_t *restrict code,
                                  const float *restrict value, uint8_t *restrict codes,
                                  float *restrict values) {
    for (Py_ssize_t b = 0; b < blocks; b++) {
        const float r = reciprocal[b], scale = scales[b];
        const float *y = source + b * blocksize;
        uint8_t *c = codes + b * blocksize;
        float *v = values + b * blocksize;
        for (Py_ssize_t t = 0; t < blocksize; t++) {
            float x = y[t] * r;
            x = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
            const int32_t cell = (int32_t)((x + 1.0f) * half_cells);
            const int32_t index = 2 * cell + (x > midpoint[cell]);
            c[t] = code[index];
            v[t] = value[index] * scale;
        }
    }
}

PyDoc_STRVAR(lookup_4bit_doc,
"lookup_4bit(source, blocks, blocksize, reciprocal, scales, half_cells, midpoint, code,\n"
"            value, codes, values) -> None\n\n"
"The 4-bit quantizer's table lookup over blocks x blocksize contiguous float32 values at\n"
"source (see safemerge.quant.quantize4): a code index per value into codes (uint8) and\n"
"its value times the block's scale into values (float32). Addresses are ints.");

static PyObject *lookup_4bit_entry(PyObject *self, PyObject *args) {
    unsigned long long source, reciprocal, scales, midpoint, code, value, codes, values;
    Py_ssize_t blocks, blocksize;
    float half_cells;
    if (!PyArg_ParseTuple(args, "KnnKKfKKKKK", &source, &blocks, &blocksize, &reciprocal,
                          &scales, &half_cells, &midpoint, &code, &value, &codes, &values))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    lookup_4bit((const float *)(uintptr_t)source, blocks, blocksize,
                (const float *)(uintptr_t)reciprocal, (const float *)(uintptr_t)scales,
                half_cells, (const float *)(uintptr_t)midpoint, (const uint8_t *)(uintptr_t)code,
                (const float *)(uintptr_t)value, (uint8_t *)(uintptr_t)codes,
                (float *)(uintptr_t)values);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------- codes and escapes */

SM_CLONES static void pack_codes(const uint8_t *codes, Py_ssize_t count, uint8_t *packed) {
    Py_ssize_t whole = count / 4;
    for (Py_ssize_t b = 0; b < whole; b++) {
        const uint8_t *c = codes + 4 * b;
        packed[b] = (uint8_t)(c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6));
    }
    if (count % 4) {
        uint8_t last = 0;
        for (Py_ssize_t k = 4 * whole; k < count; k++) last |= (uint8_t)(codes[k] << (2 * (k % 4)));
        packed[whole] = last;
    }
}

/* Bytes of a word that equal 2 (the escape code): the classic has-zero-byte test on
 * word ^ 0x0202...; a zero result means no escape among the eight codes. */
SM_INLINE uint64_t escape_bytes(uint64_t word) {
    uint64_t x = word ^ 0x0202020202020202ull;
    return (x - 0x0101010101010101ull) & ~x & 0x8080808080808080ull;
}

/* The escapes of a block, row by row: gather the original bits of every element whose
 * code is 2 (fuse), or put kept bits back in their places (unfuse), in flat order. Eight
 * codes are tested at a time; within a word that has an escape the gather is branchless
 * (it writes every element and advances past the escapes only), so a fuse whose delta is
 * large beside the weight (a tenth of its elements escaping, as with a random adapter)
 * costs little more than one with none. */
#define SM_ESCAPES(NAME, TYPE)                                                               \
    SM_CLONES static Py_ssize_t gather_##NAME(const TYPE *weight, Py_ssize_t stride,         \
                                              Py_ssize_t rows, Py_ssize_t cols,              \
                                              const uint8_t *codes, TYPE *escapes) {         \
        Py_ssize_t kept = 0;                                                                 \
        for (Py_ssize_t i = 0; i < rows; i++) {                                              \
            const uint8_t *c = codes + i * cols;                                             \
            const TYPE *w = weight + i * stride;                                             \
            Py_ssize_t j = 0;                                                                \
            for (; j + 8 <= cols; j += 8) {                                                  \
                uint64_t word;                                                               \
                memcpy(&word, c + j, 8);                                                     \
                if (!escape_bytes(word)) continue;                                           \
                for (int t = 0; t < 8; t++) {                                                \
                    escapes[kept] = w[j + t];                                                \
                    kept += c[j + t] == 2;                                                   \
                }                                                                            \
            }                                                                                \
            for (; j < cols; j++)                                                            \
                if (c[j] == 2) escapes[kept++] = w[j];                                       \
        }                                                                                    \
        return kept;                                                                         \
    }                                                                                        \
    static Py_ssize_t scatter_##NAME(TYPE *out, Py_ssize_t stride, Py_ssize_t rows,          \
                                     Py_ssize_t cols, const uint8_t *codes,                  \
                                     const TYPE *escapes, Py_ssize_t available) {            \
        Py_ssize_t used = 0;                                                                 \
        for (Py_ssize_t i = 0; i < rows; i++) {                                              \
            const uint8_t *c = codes + i * cols;                                             \
            TYPE *o = out + i * stride;                                                      \
            Py_ssize_t j = 0;                                                                \
            for (; j < cols; j++) {                                                          \
                if (j + 8 <= cols && (j & 7) == 0) {                                         \
                    uint64_t word;                                                           \
                    memcpy(&word, c + j, 8);                                                 \
                    if (!escape_bytes(word)) {                                               \
                        j += 7;                                                              \
                        continue;                                                            \
                    }                                                                        \
                }                                                                            \
                if (c[j] != 2) continue;                                                     \
                if (used < available) o[j] = escapes[used];                                  \
                used++;                                                                      \
            }                                                                                \
        }                                                                                    \
        return used;                                                                         \
    }

SM_ESCAPES(bits16, uint16_t)
SM_ESCAPES(bits32, uint32_t)

SM_CLONES static void unpack_codes(const uint8_t *packed, Py_ssize_t count, uint8_t *codes) {
    Py_ssize_t whole = count / 4;
    for (Py_ssize_t b = 0; b < whole; b++) {
        const uint8_t byte = packed[b];
        codes[4 * b] = byte & 3;
        codes[4 * b + 1] = (byte >> 2) & 3;
        codes[4 * b + 2] = (byte >> 4) & 3;
        codes[4 * b + 3] = byte >> 6;
    }
    for (Py_ssize_t k = 4 * whole; k < count; k++) codes[k] = (packed[k / 4] >> (2 * (k % 4))) & 3;
}

/* ----------------------------------------------------------------- Python entry points */

static int width_of(int kind) { return kind == KIND_FLOAT32 ? 4 : 2; }

static int check_kind(int kind) {
    if (kind == KIND_FLOAT32 || kind == KIND_BFLOAT16 || (kind == KIND_FLOAT16 && SM_HAS_FLOAT16))
        return 1;
    PyErr_Format(PyExc_ValueError, "no block kernel for dtype kind %d", kind);
    return 0;
}

PyDoc_STRVAR(fuse_block_doc,
"fuse_block(kind, weight, weight_stride, left, right, rank, rows, cols, out, out_stride,\n"
"           codes, packed, escapes) -> int\n\n"
"out = cast(weight + left @ right), the product as the torch fallback computes it\n"
"(left: rows x rank, right: rank x cols, float32, contiguous). With codes (a scratch of rows*cols bytes; 0 for none),\n"
"also writes the packed correction codes at packed and the escaped original bits at\n"
"escapes (room for rows*cols elements). Returns -1 when some fused element is not\n"
"finite (out then holds garbage), else the number of escapes. Addresses are ints.");

static PyObject *fuse_block(PyObject *self, PyObject *args) {
    int kind;
    unsigned long long weight, left, right, out, codes, packed, escapes;
    Py_ssize_t weight_stride, rank, rows, cols, out_stride;
    if (!PyArg_ParseTuple(args, "iKnKKnnnKnKKK", &kind, &weight, &weight_stride, &left, &right,
                          &rank, &rows, &cols, &out, &out_stride, &codes, &packed, &escapes))
        return NULL;
    if (!check_kind(kind)) return NULL;
    if (rank < 1) {
        PyErr_SetString(PyExc_ValueError, "the block kernel needs a rank of at least 1");
        return NULL;
    }
    uint8_t *code_bytes = (uint8_t *)(uintptr_t)codes;
    int bad = 0;
    Py_ssize_t kept = 0;
    Py_BEGIN_ALLOW_THREADS
    const float *l = (const float *)(uintptr_t)left;
    const float *r = (const float *)(uintptr_t)right;
    if (kind == KIND_FLOAT32) {
        bad = fuse_f32((const uint32_t *)(uintptr_t)weight, weight_stride, l, r, rank, rows, cols,
                       (uint32_t *)(uintptr_t)out, out_stride, code_bytes);
    } else if (kind == KIND_BFLOAT16) {
        bad = fuse_bf16((const uint16_t *)(uintptr_t)weight, weight_stride, l, r, rank, rows, cols,
                        (uint16_t *)(uintptr_t)out, out_stride, code_bytes);
    }
#if SM_HAS_FLOAT16
    else {
        bad = fuse_f16((const uint16_t *)(uintptr_t)weight, weight_stride, l, r, rank, rows, cols,
                       (uint16_t *)(uintptr_t)out, out_stride, code_bytes);
    }
#endif
    if (!bad && code_bytes != NULL) {
        Py_ssize_t count = rows * cols;
        pack_codes(code_bytes, count, (uint8_t *)(uintptr_t)packed);
        if (width_of(kind) == 4)
            kept = gather_bits32((const uint32_t *)(uintptr_t)weight, weight_stride, rows, cols,
                                 code_bytes, (uint32_t *)(uintptr_t)escapes);
        else
            kept = gather_bits16((const uint16_t *)(uintptr_t)weight, weight_stride, rows, cols,
                                 code_bytes, (uint16_t *)(uintptr_t)escapes);
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(bad ? -1 : kept);
}

PyDoc_STRVAR(unfuse_block_doc,
"unfuse_block(kind, fused, fused_stride, left, right, rank, rows, cols, out, out_stride,\n"
"             codes, packed, escapes, available) -> int\n\n"
"out = cast(fused - left @ right). With codes (a scratch of rows*cols bytes; 0 for none), the\n"
"packed correction at packed is applied and the block's escaped bits (available of them\n"
"at escapes) put in place; returns the number of escapes the block used. Without, returns\n"
"-1 when some element is not finite, else 0. Addresses are ints.");

static PyObject *unfuse_block(PyObject *self, PyObject *args) {
    int kind;
    unsigned long long fused, left, right, out, codes, packed, escapes;
    Py_ssize_t fused_stride, rank, rows, cols, out_stride, available;
    if (!PyArg_ParseTuple(args, "iKnKKnnnKnKKKn", &kind, &fused, &fused_stride, &left, &right,
                          &rank, &rows, &cols, &out, &out_stride, &codes, &packed, &escapes,
                          &available))
        return NULL;
    if (!check_kind(kind)) return NULL;
    if (rank < 1) {
        PyErr_SetString(PyExc_ValueError, "the block kernel needs a rank of at least 1");
        return NULL;
    }
    uint8_t *code_bytes = (uint8_t *)(uintptr_t)codes;
    int bad = 0;
    Py_ssize_t used = 0;
    Py_BEGIN_ALLOW_THREADS
    const float *l = (const float *)(uintptr_t)left;
    const float *r = (const float *)(uintptr_t)right;
    Py_ssize_t count = rows * cols;
    if (code_bytes != NULL) unpack_codes((const uint8_t *)(uintptr_t)packed, count, code_bytes);
    if (kind == KIND_FLOAT32) {
        bad = unfuse_f32((const uint32_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows, cols,
                         (uint32_t *)(uintptr_t)out, out_stride, code_bytes);
    } else if (kind == KIND_BFLOAT16) {
        bad = unfuse_bf16((const uint16_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows, cols,
                          (uint16_t *)(uintptr_t)out, out_stride, code_bytes);
    }
#if SM_HAS_FLOAT16
    else {
        bad = unfuse_f16((const uint16_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows, cols,
                         (uint16_t *)(uintptr_t)out, out_stride, code_bytes);
    }
#endif
    if (code_bytes != NULL) {
        if (width_of(kind) == 4)
            used = scatter_bits32((uint32_t *)(uintptr_t)out, out_stride, rows, cols, code_bytes,
                                  (const uint32_t *)(uintptr_t)escapes, available);
        else
            used = scatter_bits16((uint16_t *)(uintptr_t)out, out_stride, rows, cols, code_bytes,
                                  (const uint16_t *)(uintptr_t)escapes, available);
    }
    Py_END_ALLOW_THREADS
    if (code_bytes != NULL && used != available) {
        PyErr_Format(PyExc_ValueError, "the block has %zd escapes but the correction kept %zd",
                     used, available);
        return NULL;
    }
    return PyLong_FromSsize_t(bad ? -1 : used);
}

PyDoc_STRVAR(screen_block_doc,
"screen_block(kind, weight, weight_stride, fused, fused_stride, left, right, rank, rows,\n"
"             cols, row_sums, row_weight, column_scale, floor, threshold, found, room,\n"
"             exact_left, exact_right_t, alpha, alpha_stride, underflow, gamma,\n"
"             smallest_normal, mantissa) -> (count, worst)\n\n"
"The bound check's screen over a block of a float16 or bfloat16 merge, row r's factor\n"
"a'_r made from row_sums[r] (float64) and row_weight. Each candidate\n"
"(an element whose screened ratio is not below threshold) is counted; with found (int64,\n"
"room of them; 0 for none) its flat index is listed, and count is -1 when they are more\n"
"than room; with exact_left (0 for none) its float64 ratio is computed, and worst is the\n"
"largest (inf where one is NaN; 0.0 without candidates).");

static PyObject *screen_block(PyObject *self, PyObject *args) {
    int kind, mantissa;
    unsigned long long weight, fused, left, right, row_sums, column_scale, found;
    unsigned long long exact_left, exact_right_t, alpha, underflow;
    Py_ssize_t weight_stride, fused_stride, rank, rows, cols, room, alpha_stride;
    unsigned int floor;
    float threshold;
    double row_weight, gamma, smallest_normal;
    if (!PyArg_ParseTuple(args, "iKnKnKKnnnKdKIfKnKKKnKddi", &kind, &weight, &weight_stride,
                          &fused, &fused_stride, &left, &right, &rank, &rows, &cols, &row_sums,
                          &row_weight, &column_scale, &floor, &threshold, &found, &room,
                          &exact_left,
                          &exact_right_t, &alpha, &alpha_stride, &underflow, &gamma,
                          &smallest_normal, &mantissa))
        return NULL;
    if (kind != KIND_BFLOAT16 && !(kind == KIND_FLOAT16 && SM_HAS_FLOAT16)) {
        PyErr_Format(PyExc_ValueError, "no bound screen for dtype kind %d", kind);
        return NULL;
    }
    if (rank < 1) {
        PyErr_SetString(PyExc_ValueError, "the bound screen needs a rank of at least 1");
        return NULL;
    }
    const exact_terms exact = {
        (const double *)(uintptr_t)exact_left, (const double *)(uintptr_t)exact_right_t,
        (const double *)(uintptr_t)alpha,      alpha_stride,
        (const double *)(uintptr_t)underflow,  gamma,
        smallest_normal,                       mantissa,
    };
    candidates c = {exact_left != 0 ? &exact : NULL, (int64_t *)(uintptr_t)found, room, 0, 0.0};
    int full = 0;
    Py_BEGIN_ALLOW_THREADS
    const float *l = (const float *)(uintptr_t)left;
    const float *r = (const float *)(uintptr_t)right;
    const double *a = (const double *)(uintptr_t)row_sums;
    const float *b = (const float *)(uintptr_t)column_scale;
    if (kind == KIND_BFLOAT16) {
        full = screen_bf16((const uint16_t *)(uintptr_t)weight, weight_stride,
                           (const uint16_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows,
                           cols, a, row_weight, b, floor, threshold, &c);
    }
#if SM_HAS_FLOAT16
    else {
        full = screen_f16((const uint16_t *)(uintptr_t)weight, weight_stride,
                          (const uint16_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows,
                          cols, a, row_weight, b, floor, threshold, &c);
    }
#endif
    Py_END_ALLOW_THREADS
    return Py_BuildValue("nd", full ? (Py_ssize_t)-1 : c.count, c.worst);
}

static PyObject *has_float16(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(SM_HAS_FLOAT16);
}

static PyMethodDef methods[] = {
    {"fuse_block", fuse_block, METH_VARARGS, fuse_block_doc},
    {"unfuse_block", unfuse_block, METH_VARARGS, unfuse_block_doc},
    {"screen_block", screen_block, METH_VARARGS, screen_block_doc},
    {"lookup_4bit", lookup_4bit_entry, METH_VARARGS, lookup_4bit_doc},
    {"has_float16", has_float16, METH_NOARGS, "Whether float16 blocks are supported."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockops",
    "The engine's one-pass block kernel (see safemerge.merge.kernel).", -1, methods,
};

PyMODINIT_FUNC PyInit__blockops(void) { return PyModule_Create(&module); }
