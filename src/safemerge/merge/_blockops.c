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

/* A vector times a scalar: GCC broadcasts the scalar with one instruction (an explicit
 * {l, l, ...} vector literal costs nine). Multiplication commutes exactly in IEEE. */
SM_INLINE void product_tile(const float *restrict left, const float *restrict right,
                            Py_ssize_t cols, Py_ssize_t rank, float *restrict acc) {
    float8 a[TILE / 8];
    const float l0 = left[0];
    for (int v = 0; v < TILE / 8; v++) a[v] = load8(right + 8 * v) * l0;
    for (Py_ssize_t k = 1; k < rank; k++) {
        const float *r = right + k * cols;
        const float lk = left[k];
        for (int v = 0; v < TILE / 8; v++) a[v] = a[v] + load8(r + 8 * v) * lk;
    }
    for (int v = 0; v < TILE / 8; v++) memcpy(acc + 8 * v, &a[v], sizeof a[v]);
}

/* The product of ``n`` columns of one row, from column ``j0``, into ``acc``. */
SM_INLINE void product_segment(const float *restrict left, const float *restrict right,
                               Py_ssize_t cols, Py_ssize_t rank, Py_ssize_t j0, Py_ssize_t n,
                               float *restrict acc) {
    Py_ssize_t t = 0;
    for (; t + TILE <= n; t += TILE) product_tile(left, right + j0 + t, cols, rank, acc + t);
    if (t == n) return;
    for (Py_ssize_t u = t; u < n; u++) acc[u] = left[0] * right[j0 + u];
    for (Py_ssize_t k = 1; k < rank; k++) {
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
                             float *restrict acc0, float *restrict acc1) {
    float8 a[TILE / 16], b[TILE / 16];
    const float l0 = left0[0], m0 = left1[0];
    for (int v = 0; v < TILE / 16; v++) {
        const float8 r = load8(right + 8 * v);
        a[v] = r * l0;
        b[v] = r * m0;
    }
    for (Py_ssize_t k = 1; k < rank; k++) {
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
                                float *restrict acc1) {
    Py_ssize_t t = 0;
    for (; t + TILE / 2 <= n; t += TILE / 2)
        product_tile2(left0, left1, right + j0 + t, cols, rank, acc0 + t, acc1 + t);
    if (t == n) return;
    for (Py_ssize_t u = t; u < n; u++) {
        acc0[u] = left0[0] * right[j0 + u];
        acc1[u] = left1[0] * right[j0 + u];
    }
    for (Py_ssize_t k = 1; k < rank; k++) {
        const float l = left0[k], m = left1[k];
        const float *r = right + k * cols + j0;
        for (Py_ssize_t u = t; u < n; u++) {
            acc0[u] = acc0[u] + l * r[u];
            acc1[u] = acc1[u] + m * r[u];
        }
    }
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
                if (pair)                                                                    \
                    product_segment2(left + i * rank, left + (i + 1) * rank, right, cols,    \
                                     rank, j0, n, product[0], product[1]);                   \
                else                                                                         \
                    product_segment(left + i * rank, right, cols, rank, j0, n, product[0]);  \
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
        int bad = 0;                                                                         \
        float product[2][SEGMENT];                                                           \
        for (Py_ssize_t i = 0; i < rows; i += 2) {                                           \
            const int pair = i + 1 < rows;                                                   \
            for (Py_ssize_t j0 = 0; j0 < cols; j0 += SEGMENT) {                              \
                Py_ssize_t n = cols - j0 < SEGMENT ? cols - j0 : SEGMENT;                    \
                if (pair)                                                                    \
                    product_segment2(left + i * rank, left + (i + 1) * rank, right, cols,    \
                                     rank, j0, n, product[0], product[1]);                   \
                else                                                                         \
                    product_segment(left + i * rank, right, cols, rank, j0, n, product[0]);  \
                for (int h = 0; h <= pair; h++) {                                            \
                    Py_ssize_t row = i + h;                                                  \
                    bad |= NAME##_segment(weight + row * weight_stride + j0, product[h], n,  \
                                          out + row * out_stride + j0,                       \
                                          codes == NULL ? NULL : codes + row * cols + j0);   \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        return bad;                                                                          \
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
        int bad = 0;                                                                         \
        float product[2][SEGMENT];                                                           \
        for (Py_ssize_t i = 0; i < rows; i += 2) {                                           \
            const int pair = i + 1 < rows;                                                   \
            for (Py_ssize_t j0 = 0; j0 < cols; j0 += SEGMENT) {                              \
                Py_ssize_t n = cols - j0 < SEGMENT ? cols - j0 : SEGMENT;                    \
                if (pair)                                                                    \
                    product_segment2(left + i * rank, left + (i + 1) * rank, right, cols,    \
                                     rank, j0, n, product[0], product[1]);                   \
                else                                                                         \
                    product_segment(left + i * rank, right, cols, rank, j0, n, product[0]);  \
                for (int h = 0; h <= pair; h++) {                                            \
                    Py_ssize_t row = i + h;                                                  \
                    bad |= NAME##_segment(fused + row * fused_stride + j0, product[h], n,  \
                                          out + row * out_stride + j0,                       \
                                          codes == NULL ? NULL : codes + row * cols + j0);   \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        return bad;                                                                          \
    }

SM_FUSE_LOOP(fuse_f32, uint32_t, f32_value, float_to_bits, f32_bad, diff32)
SM_FUSE_LOOP(fuse_bf16, uint16_t, bf16_value, bf16_bits, bf16_bad, diff16)
SM_UNFUSE_LOOP(unfuse_f32, uint32_t, f32_value, float_to_bits, f32_bad)
SM_UNFUSE_LOOP(unfuse_bf16, uint16_t, bf16_value, bf16_bits, bf16_bad)
#if SM_HAS_FLOAT16
SM_FUSE_LOOP(fuse_f16, uint16_t, f16_value, f16_bits, f16_bad, diff16)
SM_UNFUSE_LOOP(unfuse_f16, uint16_t, f16_value, f16_bits, f16_bad)
#endif

/* ------------------------------------------------------------------ the bound screen
 * For safemerge.merge.bound_check's _Screen (its docstring has the proof): per element,
 * Y = W + P' in float32, where P' is the rank-r product computed independently of the
 * fuse's (k from last to first: another order of the same recursive sum, so the bound's
 * gamma covers it, and a systematic slip in one order shows as |Y - F|), then
 * q = (|Y - F| + a_r * b_c) / p, p = Y's exponent bits (at least ``floor``), and the flat
 * indices of the elements whose q is not below ``threshold`` (NaN included).
 */

SM_INLINE void reverse_product_tile(const float *restrict left, const float *restrict right,
                                    Py_ssize_t cols, Py_ssize_t rank, float *restrict acc) {
    float8 a[TILE / 8];
    const float *last = right + (rank - 1) * cols;
    const float l_last = left[rank - 1];
    for (int v = 0; v < TILE / 8; v++) a[v] = load8(last + 8 * v) * l_last;
    for (Py_ssize_t k = rank - 2; k >= 0; k--) {
        const float *r = right + k * cols;
        const float lk = left[k];
        for (int v = 0; v < TILE / 8; v++) a[v] = a[v] + load8(r + 8 * v) * lk;
    }
    for (int v = 0; v < TILE / 8; v++) memcpy(acc + 8 * v, &a[v], sizeof a[v]);
}

SM_INLINE void reverse_product_segment(const float *restrict left, const float *restrict right,
                                       Py_ssize_t cols, Py_ssize_t rank, Py_ssize_t j0,
                                       Py_ssize_t n, float *restrict acc) {
    Py_ssize_t t = 0;
    for (; t + TILE <= n; t += TILE)
        reverse_product_tile(left, right + j0 + t, cols, rank, acc + t);
    if (t == n) return;
    for (Py_ssize_t u = t; u < n; u++) acc[u] = left[rank - 1] * right[(rank - 1) * cols + j0 + u];
    for (Py_ssize_t k = rank - 2; k >= 0; k--) {
        const float l = left[k];
        const float *r = right + k * cols + j0;
        for (Py_ssize_t u = t; u < n; u++) acc[u] = acc[u] + l * r[u];
    }
}

#define SM_SCREEN_LOOP(NAME, TYPE, TO_FLOAT)                                                 \
    SM_INLINE void NAME##_segment(const TYPE *restrict w, const TYPE *restrict f,            \
                                  const float *restrict p, float a, const float *restrict b, \
                                  uint32_t floor, Py_ssize_t n, float *restrict q) {         \
        for (Py_ssize_t t = 0; t < n; t++) {                                                 \
            float y = TO_FLOAT(w[t]) + p[t];                                                 \
            uint32_t power = float_to_bits(y) & 0x7F800000u;                                 \
            power = power < floor ? floor : power;                                           \
            float difference = y - TO_FLOAT(f[t]);                                           \
            float magnitude = difference < 0 ? -difference : difference;                     \
            q[t] = (magnitude + a * b[t]) / bits_to_float(power);                            \
        }                                                                                    \
    }                                                                                        \
    SM_CLONES static Py_ssize_t NAME(const TYPE *weight, Py_ssize_t weight_stride,           \
                                     const TYPE *fused, Py_ssize_t fused_stride,             \
                                     const float *left, const float *right, Py_ssize_t rank, \
                                     Py_ssize_t rows, Py_ssize_t cols,                       \
                                     const float *row_scale, const float *column_scale,      \
                                     uint32_t floor, float threshold, int64_t *found,        \
                                     Py_ssize_t room) {                                      \
        Py_ssize_t count = 0;                                                                \
        float product[SEGMENT], q[SEGMENT];                                                  \
        for (Py_ssize_t i = 0; i < rows; i++) {                                              \
            for (Py_ssize_t j0 = 0; j0 < cols; j0 += SEGMENT) {                              \
                Py_ssize_t n = cols - j0 < SEGMENT ? cols - j0 : SEGMENT;                    \
                reverse_product_segment(left + i * rank, right, cols, rank, j0, n, product); \
                NAME##_segment(weight + i * weight_stride + j0, fused + i * fused_stride + j0, \
                               product, row_scale[i], column_scale + j0, floor, n, q);       \
                for (Py_ssize_t t = 0; t < n; t++) {                                         \
                    if (q[t] < threshold) continue;                                          \
                    if (count == room) return -1;                                            \
                    found[count++] = i * cols + j0 + t;                                      \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        return count;                                                                        \
    }

SM_SCREEN_LOOP(screen_bf16, uint16_t, bf16_value)
#if SM_HAS_FLOAT16
SM_SCREEN_LOOP(screen_f16, uint16_t, f16_value)
#endif

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
"             cols, row_scale, column_scale, floor, threshold, found, room) -> int\n\n"
"The bound check's screen over a block of a float16 or bfloat16 merge: writes the flat\n"
"indices of the elements whose screened ratio is not below threshold into found (int64,\n"
"room of them) and returns their count, or -1 when there are more than room.");

static PyObject *screen_block(PyObject *self, PyObject *args) {
    int kind;
    unsigned long long weight, fused, left, right, row_scale, column_scale, found;
    Py_ssize_t weight_stride, fused_stride, rank, rows, cols, room;
    unsigned int floor;
    float threshold;
    if (!PyArg_ParseTuple(args, "iKnKnKKnnnKKIfKn", &kind, &weight, &weight_stride, &fused,
                          &fused_stride, &left, &right, &rank, &rows, &cols, &row_scale,
                          &column_scale, &floor, &threshold, &found, &room))
        return NULL;
    if (kind != KIND_BFLOAT16 && !(kind == KIND_FLOAT16 && SM_HAS_FLOAT16)) {
        PyErr_Format(PyExc_ValueError, "no bound screen for dtype kind %d", kind);
        return NULL;
    }
    if (rank < 1) {
        PyErr_SetString(PyExc_ValueError, "the bound screen needs a rank of at least 1");
        return NULL;
    }
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    const float *l = (const float *)(uintptr_t)left;
    const float *r = (const float *)(uintptr_t)right;
    const float *a = (const float *)(uintptr_t)row_scale;
    const float *b = (const float *)(uintptr_t)column_scale;
    int64_t *out = (int64_t *)(uintptr_t)found;
    if (kind == KIND_BFLOAT16) {
        count = screen_bf16((const uint16_t *)(uintptr_t)weight, weight_stride,
                            (const uint16_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows,
                            cols, a, b, floor, threshold, out, room);
    }
#if SM_HAS_FLOAT16
    else {
        count = screen_f16((const uint16_t *)(uintptr_t)weight, weight_stride,
                           (const uint16_t *)(uintptr_t)fused, fused_stride, l, r, rank, rows,
                           cols, a, b, floor, threshold, out, room);
    }
#endif
    Py_END_ALLOW_THREADS
    return PyLong_FromSsize_t(count);
}

static PyObject *has_float16(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(SM_HAS_FLOAT16);
}

static PyMethodDef methods[] = {
    {"fuse_block", fuse_block, METH_VARARGS, fuse_block_doc},
    {"unfuse_block", unfuse_block, METH_VARARGS, unfuse_block_doc},
    {"screen_block", screen_block, METH_VARARGS, screen_block_doc},
    {"has_float16", has_float16, METH_NOARGS, "Whether float16 blocks are supported."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockops",
    "The engine's one-pass block kernel (see safemerge.merge.kernel).", -1, methods,
};

PyMODINIT_FUNC PyInit__blockops(void) { return PyModule_Create(&module); }
