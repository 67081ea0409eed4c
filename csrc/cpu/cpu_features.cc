// Runtime choice of the SIMD variant: one binary runs on any x86-64 and uses
// AVX-512 or AVX2 where the CPU has them.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include "cpu_simd.h"
#include "ndf/quantile.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define NDF_X86 1
#endif

namespace ndf {
namespace {

// Appends the values > bound to out[count...] (room for n values is guaranteed
// by the caller) and returns the new count. Branch-free: always store, advance
// only when the value qualifies.
int64_t append_greater_scalar(const float* v, int64_t n, float bound, float* out, int64_t count) {
  for (int64_t i = 0; i < n; ++i) {
    out[count] = v[i];
    count += v[i] > bound;
  }
  return count;
}

int64_t first_bad_map(const float* base, int64_t count, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (!std::isfinite(base[i * stride + j])) return i;
  return -1;
}

// Folds v[from, n) into a map's running maximum, largest magnitude and poison
// (NaN once any value is NaN or infinite).
inline void scan_tail(const float* v, int64_t from, int64_t n, float& m, float& a, float& poison) {
  for (int64_t j = from; j < n; ++j) {
    m = v[j] > m ? v[j] : m;
    const float x = std::fabs(v[j]);
    a = x > a ? x : a;
    poison += v[j] * 0.0f;
  }
}

int64_t scan_maps_scalar(const float* base, int64_t count, int64_t stride, int64_t n, float* mx, float* amax) {
  float poison = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    float m = -INFINITY, a = 0.0f;
    scan_tail(base + i * stride, 0, n, m, a, poison);
    mx[i] = m > 0.0f ? m : 0.0f;  // ScanMapsFn's max(0, maximum)
    amax[i] = a;
  }
  return poison == 0.0f ? -1 : first_bad_map(base, count, stride, n);
}

// The fused quantile scan's loop for the variants that find a map's maximum
// first and append only hot maps (scalar, AVX2): map_max(v, n, poison) returns
// the maximum and folds the map into `poison` (NaN once a value is not finite).
template <class MapMax>
int64_t scan_append_by_max(MapMax map_max, const float* base, int64_t count, int64_t stride, int64_t n,
                           const float* bound, float* tails, int64_t tstride, int64_t* held, int64_t limit,
                           float* mx, bool* bad) {
  float poison = 0.0f;
  int64_t i = 0;
  while (i < count) {
    const float* v = base + i * stride;
    const float m = map_max(v, n, poison);
    if (mx) mx[i] = m;
    const bool hot = m > bound[i];
    if (hot) held[i] = append_greater_scalar(v, n, bound[i], tails + i * tstride, held[i]);
    ++i;
    if (hot && held[i - 1] > limit) break;
  }
  *bad = poison != 0.0f;
  return i;
}

float map_max_scalar(const float* v, int64_t n, float& poison) {
  float m = -INFINITY, a = 0.0f;
  scan_tail(v, 0, n, m, a, poison);
  return m;
}

int64_t scan_append_scalar(const float* base, int64_t count, int64_t stride, int64_t n, const float* bound,
                           float* tails, int64_t tstride, int64_t* held, int64_t limit, float* mx, bool* bad) {
  return scan_append_by_max(map_max_scalar, base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
}

void interp_row_scalar(const float* row, int64_t /*mw*/, const int32_t* x0, const int32_t* x1, const float* wx0,
                       const float* wx1, int64_t n, float* out) {
  for (int64_t px = 0; px < n; ++px) out[px] = std::fma(wx0[px], row[x0[px]], wx1[px] * row[x1[px]]);
}

// cnt[s] += pixels, appending s to the touched list when its count leaves 0
// (touched has a spare entry: it is written whether or not s is new, so no
// branch mispredicts on it).
__attribute__((always_inline)) inline void add_set_pixels(uint16_t s, int32_t pixels, int32_t* cnt, int32_t* touched,
                                                           int64_t& nt) {
  const int32_t c = cnt[s];
  touched[nt] = s;
  nt += c == 0;
  cnt[s] = c + pixels;
}

// The row walk of every counter, over the `rows` rows of a cell span in one
// chunk: down from the top edge while row(r) holds (when the top source row has
// a pixel above skip), then up from the bottom edge (when that one has) as far as
// the first walk stopped. row(r) thresholds and counts row r, and returns false
// once every pixel of it is <= skip.
//
// Why stopping there is exact: per pixel, lerp_y is linear in the row weight,
// so a pixel falling away from the edge stays <= skip past that row (exactly;
// <= T once computed, by CountSpanFn's contract on skip), and one rising away
// from it is the other walk's. The rows visited are the mask's rows plus about
// one per walk, and the loop leaves once per walk instead of branching where the
// mask starts and ends.
template <class Row>
__attribute__((always_inline)) inline void walk_rows(int64_t rows, bool top_hot, bool bot_hot, const Row& row) {
  int64_t r = 0;
  if (top_hot)
    while (r < rows && row(r)) ++r;
  if (bot_hot)
    for (int64_t q = rows - 1; q >= r && row(q); --q) {
    }
}

// count_span_avx512's column skip and row walk in portable C++ (the 16-lane
// loops are left to the compiler's vectorizer), counting a pixel at a time: the
// path of CPUs without AVX2, ARM included.
int64_t count_span_walk(const float* top, const float* bot, const AxisWeight* wy, int64_t rows, float T,
                        float skip, int64_t xa, int64_t xb, const uint16_t* sets, int64_t sw, int32_t* cnt,
                        int32_t* touched, int64_t* ntouched) {
  int64_t M = 0, nt = *ntouched;
  for (int64_t px = xa; px < xb; px += 16) {
    const int64_t n = std::min<int64_t>(16, xb - px);
    const float *u = top + px, *v = bot + px;
    bool top_hot = false, bot_hot = false;
    for (int64_t i = 0; i < n; ++i) {
      top_hot |= u[i] > skip;
      bot_hot |= v[i] > skip;
    }
    // One row of a walk: false when every pixel is <= skip.
    const auto walk_row = [&](int64_t r) {
      uint32_t above_skip = 0, above_t = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float x = std::fma(wy[r].w0, u[i], wy[r].w1 * v[i]);
        above_skip |= uint32_t(x > skip) << i;
        above_t |= uint32_t(x > T) << i;
      }
      if (!above_skip) return false;
      M += __builtin_popcount(above_t);
      for (uint32_t w = above_t; w; w &= w - 1u) add_set_pixels(sets[r * sw + px + __builtin_ctz(w)], 1, cnt, touched, nt);
      return true;
    };
    walk_rows(rows, top_hot, bot_hot, walk_row);
  }
  *ntouched = nt;
  return M;
}

void hot_rows_scalar(const float* m, int64_t mh, int64_t mw, float t, uint64_t* rowbits) {
  for (int64_t i = 0; i < mh; ++i) {
    uint64_t hot = 0;
    for (int64_t j = 0; j < mw; ++j) hot |= uint64_t(m[i * mw + j] > t) << j;
    rowbits[i] = hot;
  }
}

float select_top_scalar(float* v, int64_t n, int64_t keep, float* /*tmp*/) {
  std::nth_element(v, v + (keep - 1), v + n, std::greater<float>());
  return v[keep - 1];
}

#ifdef NDF_X86
// Moves the elements of v[0, n) for which `keep_first(x)` holds to the front, in
// place, the others after them; returns how many came first.
template <int Cmp>
__attribute__((target("avx512f"))) inline int64_t partition_avx512(float* v, int64_t n, float pivot, float* tmp) {
  const __m512 p = _mm512_set1_ps(pivot);
  int64_t front = 0, back = 0, i = 0;
  // Full vectors: full-width stores of register compresses (a masked compress to
  // memory is several times slower). front, back <= i, so the 16 lanes written
  // stay within [0, i + 16): only lanes already read are overwritten.
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __mmask16 first = _mm512_cmp_ps_mask(x, p, Cmp);
    const __mmask16 rest = __mmask16(~first);
    _mm512_storeu_ps(v + front, _mm512_maskz_compress_ps(first, x));
    _mm512_storeu_ps(tmp + back, _mm512_maskz_compress_ps(rest, x));
    front += __builtin_popcount(unsigned(first));
    back += 16 - __builtin_popcount(unsigned(first));
  }
  if (i < n) {  // the last partial vector must not write past n
    const __mmask16 live = __mmask16((1u << (n - i)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(live, v + i);
    const __mmask16 first = _mm512_mask_cmp_ps_mask(live, x, p, Cmp);
    const __mmask16 rest = __mmask16(live & ~first);
    _mm512_mask_compressstoreu_ps(v + front, first, x);
    _mm512_mask_compressstoreu_ps(tmp + back, rest, x);
    front += __builtin_popcount(unsigned(first));
    back += __builtin_popcount(unsigned(rest));
  }
  std::memcpy(v + front, tmp, size_t(back) * sizeof(float));
  return front;
}

__attribute__((target("avx512f"))) void hot_rows_avx512(const float* m, int64_t mh, int64_t mw, float t,
                                                       uint64_t* rowbits) {
  const __m512 tv = _mm512_set1_ps(t);
  for (int64_t i = 0; i < mh; ++i) {
    uint64_t hot = 0;
    for (int64_t j = 0; j < mw; j += 16) {
      const __mmask16 live = __mmask16(mw - j >= 16 ? 0xffffu : (1u << (mw - j)) - 1u);
      hot |= uint64_t(_mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, m + i * mw + j), tv, _CMP_GT_OQ))
             << j;
    }
    rowbits[i] = hot;
  }
}

__attribute__((target("avx2"))) void hot_rows_avx2(const float* m, int64_t mh, int64_t mw, float t,
                                                   uint64_t* rowbits) {
  const __m256 tv = _mm256_set1_ps(t);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < mh; ++i) {
    uint64_t hot = 0;
    for (int64_t j = 0; j < mw; j += 8) {
      const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(mw - j < 8 ? mw - j : 8)), lane);
      const __m256 x = _mm256_maskload_ps(m + i * mw + j, live);  // masked-off lanes read as 0
      const uint32_t gt = uint32_t(_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, tv, _CMP_GT_OQ),
                                                                    _mm256_castsi256_ps(live))));
      hot |= uint64_t(gt) << j;
    }
    rowbits[i] = hot;
  }
}

__attribute__((target("avx512f"))) float select_top_avx512(float* v, int64_t n, int64_t keep, float* tmp) {
  // Invariant: everything before lo is >= everything in [lo, hi) >= everything after hi;
  // rank r (0-based, largest first) lies in [lo, hi).
  int64_t lo = 0, hi = n;
  const int64_t r = keep - 1;
  while (hi - lo > 64) {
    float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));  // median of three
    const int64_t g = partition_avx512<_CMP_GT_OQ>(v + lo, hi - lo, pivot, tmp);
    if (r < lo + g) {
      hi = lo + g;
      continue;
    }
    const int64_t e = partition_avx512<_CMP_GE_OQ>(v + lo + g, hi - lo - g, pivot, tmp);  // == pivot
    if (r < lo + g + e) return pivot;  // rank r falls among values equal to the pivot
    lo += g + e;
  }
  std::nth_element(v + lo, v + r, v + hi, std::greater<float>());
  return v[r];
}

// Lane i of the result = the maximum of the 16 lanes of v[i]: a transpose-and-max
// network, ~3 instructions per vector instead of a full horizontal reduction each.
// `max` combines two vectors lane by lane (on floats, or on their bits as
// integers: the shuffles move bits whatever they mean).
template <class Max>
__attribute__((target("avx512f"), always_inline)) inline __m512 max16_transposed(const __m512* v, Max max) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)  // 128-bit halves: lanes 0-7 from v[2j], 8-15 from v[2j+1]
    a[j] = max(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44), _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // 4 values per map, maps 4j..4j+3 in 128-bit lanes 0..3
    b[j] = max(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x88), _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // within 128-bit lanes: 2 values of map L (from b[2j]) and of map L+4
    c[j] = max(_mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0x44), _mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0xEE));
  const __m512 d = max(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
  // d's lane 4L + j holds map L + 4j (L: 128-bit lane, j: position within it)
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}
struct MaxEpi32 {  // on the bits as signed integers
  __attribute__((target("avx512f"), always_inline)) __m512 operator()(__m512 x, __m512 y) const {
    return _mm512_castsi512_ps(_mm512_max_epi32(_mm512_castps_si512(x), _mm512_castps_si512(y)));
  }
};
struct MaxEpu32 {  // on the bits as unsigned integers
  __attribute__((target("avx512f"), always_inline)) __m512 operator()(__m512 x, __m512 y) const {
    return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(x), _mm512_castps_si512(y)));
  }
};

// scan_maps_avx512's pass over 16 maps of n = full + popcount(tail) floats: per
// map the unsigned (U) and/or signed (S) maximum of the values' bits, from 0.
template <bool U, bool S>
__attribute__((target("avx512f"), always_inline)) inline void group_maxima(const float* const* v, int64_t full,
                                                                         __mmask16 tail, __m512i* u, __m512i* s) {
  for (int64_t g = 0; g < 16; ++g) {
    __m512i uu = _mm512_setzero_si512(), ss = _mm512_setzero_si512();
    for (int64_t j = 0; j < full; j += 16) {
      const __m512i x = _mm512_loadu_si512(v[g] + j);
      if (U) uu = _mm512_max_epu32(uu, x);
      if (S) ss = _mm512_max_epi32(ss, x);
    }
    if (tail) {
      const __m512i x = _mm512_maskz_loadu_epi32(tail, v[g] + full);
      if (U) uu = _mm512_max_epu32(uu, x);
      if (S) ss = _mm512_max_epi32(ss, x);
    }
    if (U) u[g] = uu;
    if (S) s[g] = ss;
  }
}

__attribute__((target("avx512f"))) int64_t scan_maps_avx512(const float* base, int64_t count, int64_t stride,
                                                            int64_t n, float* mx, float* amax) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i pos_inf = _mm512_set1_epi32(0x7f800000), neg_inf = _mm512_set1_epi32(int(0xff800000u));
  const __m512i sign_bit = _mm512_set1_epi32(int(0x80000000u));
  const int64_t full = n & ~int64_t(15);
  const __mmask16 tail = __mmask16((1u << (n - full)) - 1u);
  // Integer maxima of the values' bits. As unsigned integers the largest is
  // the largest value when none is negative (no sign bit), else the negative
  // value of largest magnitude, and -infinity or a NaN of sign - when there is
  // one. As signed integers the largest is max(0, maximum) (any positive
  // float's bits beat every negative one's, and the maxima start at 0), and
  // +infinity or a NaN of sign + when there is one. Together: max(0, maximum),
  // the largest magnitude, and every NaN and infinity, one compare each per 16
  // maps. (The tail's zero lanes change neither.) The signed maximum is needed
  // only where some value has its sign bit set: rectified activations take one
  // instruction per vector. Once a group of 16 maps needed it, the next group
  // takes both maxima in one pass.
  __mmask16 bad = 0;
  __m512i s[16], u[16];
  bool both = false;
  for (int64_t i0 = 0; i0 < count; i0 += 16) {
    const int64_t group = count - i0 < 16 ? count - i0 : 16;
    const float* v[16];
    for (int64_t g = 0; g < 16; ++g)  // a short group is padded with map i0
      v[g] = base + (i0 + (g < group ? g : 0)) * stride;
    const __mmask16 live = __mmask16(group == 16 ? 0xffffu : (1u << group) - 1u);
    if (both) group_maxima<true, true>(v, full, tail, u, s);
    else group_maxima<true, false>(v, full, tail, u, s);
    const __m512i low = _mm512_castps_si512(max16_transposed(reinterpret_cast<const __m512*>(u), MaxEpu32()));
    const bool negative = _mm512_mask_test_epi32_mask(live, low, sign_bit);
    __m512i top = low;  // no sign bit: the unsigned maximum is the maximum
    if (negative) {
      if (!both) group_maxima<false, true>(v, full, tail, u, s);
      top = _mm512_castps_si512(max16_transposed(reinterpret_cast<const __m512*>(s), MaxEpi32()));
    }
    both = negative;
    _mm512_mask_storeu_epi32(mx + i0, live, top);
    _mm512_mask_storeu_epi32(amax + i0, live, _mm512_max_epi32(top, _mm512_and_si512(low, abs_mask)));
    bad |= _mm512_mask_cmpge_epi32_mask(live, top, pos_inf) | _mm512_mask_cmpge_epu32_mask(live, low, neg_inf);
  }
  return bad ? first_bad_map(base, count, stride, n) : -1;
}

__attribute__((target("avx2,fma"))) int64_t scan_maps_avx2(const float* base, int64_t count, int64_t stride,
                                                          int64_t n, float* mx, float* amax) {
  const __m256 zero = _mm256_setzero_ps(), ninf = _mm256_set1_ps(-INFINITY);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 poison = zero;
  float tail_poison = 0.0f;
  const int64_t full = n & ~int64_t(7);
  for (int64_t i = 0; i < count; ++i) {
    const float* v = base + i * stride;
    __m256 m = ninf, a = zero;
    for (int64_t j = 0; j < full; j += 8) {
      const __m256 x = _mm256_loadu_ps(v + j);
      m = _mm256_max_ps(m, x);
      a = _mm256_max_ps(a, _mm256_and_ps(x, abs_mask));
      poison = _mm256_fmadd_ps(x, zero, poison);
    }
    alignas(32) float m8[8], a8[8];
    _mm256_store_ps(m8, m);
    _mm256_store_ps(a8, a);
    float mm = m8[0], aa = a8[0];
    for (int j = 1; j < 8; ++j) {
      mm = m8[j] > mm ? m8[j] : mm;
      aa = a8[j] > aa ? a8[j] : aa;
    }
    scan_tail(v, full, n, mm, aa, tail_poison);
    mx[i] = mm > 0.0f ? mm : 0.0f;  // ScanMapsFn's max(0, maximum)
    amax[i] = aa;
  }
  alignas(32) float p8[8];
  _mm256_store_ps(p8, poison);
  for (float p : p8) tail_poison += p;
  return tail_poison == 0.0f ? -1 : first_bad_map(base, count, stride, n);
}

__attribute__((target("avx2,fma"))) float map_max_avx2(const float* v, int64_t n, float& poison) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 m = _mm256_set1_ps(-INFINITY), p = zero;
  const int64_t full = n & ~int64_t(7);
  for (int64_t j = 0; j < full; j += 8) {
    const __m256 x = _mm256_loadu_ps(v + j);
    m = _mm256_max_ps(m, x);
    p = _mm256_fmadd_ps(x, zero, p);
  }
  alignas(32) float m8[8], p8[8];
  _mm256_store_ps(m8, m);
  _mm256_store_ps(p8, p);
  float mm = m8[0], unused = 0.0f;
  for (int j = 1; j < 8; ++j) mm = m8[j] > mm ? m8[j] : mm;
  for (float q : p8) poison += q;
  scan_tail(v, full, n, mm, unused, poison);
  return mm;
}

int64_t scan_append_avx2(const float* base, int64_t count, int64_t stride, int64_t n, const float* bound,
                         float* tails, int64_t tstride, int64_t* held, int64_t limit, float* mx, bool* bad) {
  return scan_append_by_max(map_max_avx2, base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
}

// Output columns px..px+15 (lanes in `live`) of a source row held in one
// register: lerp_x of ndf/interp.h with the two source values fetched by permutes.
struct XWeights16 {
  __m512i j0, j1;
  __m512 w0, w1;
};
__attribute__((target("avx512f"), always_inline)) inline XWeights16 x_weights16(__mmask16 live, const int32_t* x0,
                                                               const int32_t* x1, const float* wx0,
                                                               const float* wx1) {
  return XWeights16{_mm512_maskz_loadu_epi32(live, x0), _mm512_maskz_loadu_epi32(live, x1),
                    _mm512_maskz_loadu_ps(live, wx0), _mm512_maskz_loadu_ps(live, wx1)};
}
__attribute__((target("avx512f"), always_inline)) inline __m512 lerp_x16(const XWeights16& w, __m512 row) {
  return _mm512_fmadd_ps(w.w0, _mm512_permutexvar_ps(w.j0, row), _mm512_mul_ps(w.w1, _mm512_permutexvar_ps(w.j1, row)));
}

// Same loop compiled for FMA hardware: std::fma becomes one instruction (the
// baseline build calls libm's correctly rounded fmaf instead).
__attribute__((target("avx512f"))) void interp_row_avx512(const float* row, int64_t mw, const int32_t* x0,
                                                          const int32_t* x1, const float* wx0, const float* wx1,
                                                          int64_t n, float* out) {
  if (mw > 16) {
    for (int64_t px = 0; px < n; ++px) out[px] = std::fma(wx0[px], row[x0[px]], wx1[px] * row[x1[px]]);
    return;
  }
  // The whole source row fits one register: a permute replaces 32 scalar loads.
  const __m512 r = _mm512_maskz_loadu_ps(__mmask16((1u << mw) - 1u), row);
  for (int64_t px = 0; px < n; px += 16) {
    const __mmask16 live = __mmask16(n - px >= 16 ? 0xffffu : (1u << (n - px)) - 1u);
    const XWeights16 w = x_weights16(live, x0 + px, x1 + px, wx0 + px, wx1 + px);
    _mm512_mask_storeu_ps(out + px, live, lerp_x16(w, r));
  }
}
__attribute__((target("avx2,fma"))) void interp_row_avx2(const float* row, int64_t mw, const int32_t* x0,
                                                        const int32_t* x1, const float* wx0, const float* wx1,
                                                        int64_t n, float* out) {
  if (mw > 16) {
    for (int64_t px = 0; px < n; ++px) out[px] = std::fma(wx0[px], row[x0[px]], wx1[px] * row[x1[px]]);
    return;
  }
  // The source row fits two registers: permutes (by the index's low 3 bits) and
  // a blend on index >= 8 replace the scalar loads.
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), seven = _mm256_set1_epi32(7);
  const __m256 lo = _mm256_maskload_ps(row, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(mw)), lane));
  const __m256 hi = _mm256_maskload_ps(row + 8, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(mw) - 8), lane));
  auto pick = [&](__m256i j) __attribute__((target("avx2"))) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, j), _mm256_permutevar8x32_ps(hi, j),
                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(j, seven)));
  };
  for (int64_t px = 0; px < n; px += 8) {
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n - px < 8 ? n - px : 8)), lane);
    const __m256i j0 = _mm256_maskload_epi32(x0 + px, live), j1 = _mm256_maskload_epi32(x1 + px, live);
    const __m256 w0 = _mm256_maskload_ps(wx0 + px, live), w1 = _mm256_maskload_ps(wx1 + px, live);
    _mm256_maskstore_ps(out + px, live, _mm256_fmadd_ps(w0, pick(j0), _mm256_mul_ps(w1, pick(j1))));
  }
}

// The set count of one row's mask pixels w (16 columns at p, w != 0). A row's
// 16 set ids are loaded masked (nothing outside the mask is read) and counted a
// distinct set at a time: one compare per set the chunk holds, not one step per
// pixel. `nt` grows with the sets seen for the first time.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void count_row_sets(
    __mmask16 w, const uint16_t* p, int32_t* cnt, int32_t* touched, int64_t& nt) {
  const __m256i ids = _mm256_maskz_loadu_epi16(w, p);
  do {
    const uint16_t s = p[__builtin_ctz(unsigned(w))];
    const __mmask16 eq = _mm256_mask_cmpeq_epi16_mask(w, ids, _mm256_set1_epi16(short(s)));
    w = __mmask16(w & ~eq);
    add_set_pixels(s, __builtin_popcount(unsigned(eq)), cnt, touched, nt);
  } while (w);
}

// The row counters of the AVX-512 walk: counter(row, px, w) counts the mask
// pixels w of output row `row`, columns px..px+15 (w may be 0). This one counts
// per label set; `sets` points at the set ids of (row 0, column 0) of what row
// and px index. (The other, per pixel slot, is in count_map_slots_avx512.)
struct SetRowCounter {
  const uint16_t* sets;
  int64_t sw;
  int32_t *cnt, *touched;
  int64_t nt;
  __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void operator()(int64_t row, int64_t px,
                                                                                            __mmask16 w) {
    if (w) count_row_sets(w, sets + row * sw + px, cnt, touched, nt);
  }
};

// The map walk for the set counter (AVX-512 BW) and for the slot counter (and BITALG).
namespace walk_bw {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include "map_walk_avx512.inc"
#pragma GCC pop_options
}  // namespace walk_bw
namespace walk_bitalg {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bitalg")
#include "map_walk_avx512.inc"
#pragma GCC pop_options
}  // namespace walk_bitalg

// CountSpanFn with AVX-512: columns where neither source row exceeds `skip` are
// skipped a chunk at a time (the vertical lerp cannot lift them above T), and
// rows as walk_rows visits them.
__attribute__((target("avx512f,avx512bw,avx512vl"))) int64_t count_span_avx512(
    const float* top, const float* bot, const AxisWeight* wy, int64_t rows, float T, float skip, int64_t xa,
    int64_t xb, const uint16_t* sets, int64_t sw, int32_t* cnt, int32_t* touched, int64_t* ntouched) {
  const __m512 t = _mm512_set1_ps(T), sk = _mm512_set1_ps(skip);
  SetRowCounter counter{sets, sw, cnt, touched, *ntouched};
  int64_t M = 0;
  for (int64_t px = xa; px < xb; px += 16) {
    const int64_t n = xb - px < 16 ? xb - px : 16;
    const __mmask16 live = __mmask16(n == 16 ? 0xffffu : (1u << n) - 1u);
    const __m512 u = _mm512_maskz_loadu_ps(live, top + px), v = _mm512_maskz_loadu_ps(live, bot + px);
    if (!_mm512_mask_cmp_ps_mask(live, _mm512_max_ps(u, v), sk, _CMP_GT_OQ)) continue;
    M += walk_bw::count_chunk_rows(u, v, live, wy, rows, 0, px, t, sk, counter);
  }
  *ntouched = counter.nt;
  return M;
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) int64_t count_map_avx512(
    const float* m, float T, float skip, const CellGeometry& g, const uint16_t* sets, int32_t* cnt,
    int32_t* touched, int64_t* ntouched) {
  SetRowCounter counter{sets, g.sw, cnt, touched, *ntouched};
  const int64_t M = walk_bw::count_map_chunks<1>(m, T, skip, g, counter);
  *ntouched = counter.nt;
  return M;
}

// The map counter per pixel slot (SlotWindowsFn's windows; chunks start at
// multiples of 16): per row, one AND and one 16-bit popcount per 32 slots,
// whatever the labels under the mask -- no per-set or per-label step and no
// branch.
template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bitalg"))) int64_t count_map_slots_avx512(
    const float* m, float T, float skip, const CellGeometry& g, const uint16_t* windows, const int32_t* slot_label,
    const uint32_t* slot_cats, uint32_t row, AddLog& log, uint32_t* overlap) {
  const int64_t window_stride = g.yspans[g.n_yspans - 1].end * (32 * G);  // a window's rows: sh of them
  __m512i acc[G];
  for (int i = 0; i < G; ++i) acc[i] = _mm512_setzero_si512();
  auto counter = [&](int64_t r, int64_t px, __mmask16 w)
                     __attribute__((target("avx512f,avx512bw,avx512vl,avx512bitalg"))) {
                       const __m512i bits = _mm512_set1_epi16(short(w));
                       const uint16_t* at = windows + (px >> 4) * window_stride + r * (32 * G);
                       for (int i = 0; i < G; ++i)
                         acc[i] = _mm512_add_epi16(
                             acc[i], _mm512_popcnt_epi16(_mm512_and_si512(_mm512_loadu_si512(at + 32 * i), bits)));
                     };
  const int64_t M = g.ends && g.ends->vectors ? walk_bitalg::count_map_hot_chunks(m, T, skip, g, counter)
                                              : walk_bitalg::count_map_chunks<16>(m, T, skip, g, counter);
  // The log: per 16 slots, the nonzero ones' offsets and counts compressed to
  // the front of a vector and stored whole (the next store overwrites the rest).
  const __m512i rows = _mm512_set1_epi32(int(row));
  __m512i cats = _mm512_setzero_si512();
  int64_t n = log.n;
  for (int i = 0; i < G; ++i) {
    const __mmask32 nz = _mm512_test_epi16_mask(acc[i], acc[i]);
    for (int h = 0; h < 2; ++h) {
      const __mmask16 sel = __mmask16(nz >> (16 * h));
      const int64_t s = 32 * i + 16 * h;
      const __m512i counts = _mm512_cvtepu16_epi32(h ? _mm512_extracti64x4_epi64(acc[i], 1)
                                                     : _mm512_castsi512_si256(acc[i]));
      const __m512i at = _mm512_add_epi32(rows, _mm512_loadu_si512(slot_label + s));
      _mm512_storeu_si512(log.off + n, _mm512_maskz_compress_epi32(sel, at));
      _mm512_storeu_si512(log.val + n, _mm512_maskz_compress_epi32(sel, counts));
      cats = _mm512_or_si512(cats, _mm512_maskz_loadu_epi32(sel, slot_cats + s));
      n += __builtin_popcount(unsigned(sel));
    }
  }
  log.n = n;
  *overlap |= uint32_t(_mm512_reduce_or_epi32(cats));
  return M;
}

// The slot bits of 16 pixels (lanes `live`; set ids `ids`), transposed: lane j
// of the result has bit i set when pixel i holds slot 32g + j. Each pixel's 32
// slot bits are gathered from its set's mask, then the 16x32 bit matrix is
// transposed as 8x8 blocks: a byte permute puts each block's 8 bytes (8
// pixels, 8 slots) in one qword, GF2P8AFFINEQB against the identity's rows
// transposes it, and a second permute interleaves the two 8-pixel halves.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,gfni"), always_inline)) inline __m512i slot_bits16(
    __mmask16 live, __m512i ids, const uint64_t* set_slots, int g) {
  // Block (slot byte B, pixel half h) goes to qword 2B + h; its byte m holds
  // pixel 8h + 7 - m (GF2P8AFFINEQB reads a matrix's rows in reverse order).
  alignas(64) static const uint8_t kGather[64] = {
#define NDF_Q(B, h) \
  uint8_t(4 * (8 * h + 7) + B), uint8_t(4 * (8 * h + 6) + B), uint8_t(4 * (8 * h + 5) + B), uint8_t(4 * (8 * h + 4) + B), \
  uint8_t(4 * (8 * h + 3) + B), uint8_t(4 * (8 * h + 2) + B), uint8_t(4 * (8 * h + 1) + B), uint8_t(4 * (8 * h + 0) + B)
      NDF_Q(0, 0), NDF_Q(0, 1), NDF_Q(1, 0), NDF_Q(1, 1), NDF_Q(2, 0), NDF_Q(2, 1), NDF_Q(3, 0), NDF_Q(3, 1)
#undef NDF_Q
  };
  // Output byte 2s + h (slot s = 8B + i, pixel half h) comes from byte 8(2B + h) + i.
  alignas(64) static const uint8_t kInterleave[64] = {
#define NDF_S(B, i) uint8_t(8 * (2 * B) + i), uint8_t(8 * (2 * B + 1) + i)
#define NDF_B(B) NDF_S(B, 0), NDF_S(B, 1), NDF_S(B, 2), NDF_S(B, 3), NDF_S(B, 4), NDF_S(B, 5), NDF_S(B, 6), NDF_S(B, 7)
      NDF_B(0), NDF_B(1), NDF_B(2), NDF_B(3)
#undef NDF_B
#undef NDF_S
  };
  // Dword i: the 32 slot bits (group g) of pixel i's set; 0 outside `live`.
  const __m512i bits = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, ids,
                                                   reinterpret_cast<const int*>(set_slots) + g, 8);
  const __m512i blocks = _mm512_permutexvar_epi8(_mm512_load_si512(kGather), bits);
  // Byte i of the data = 1 << i: the result's byte i is the block's column i.
  const __m512i t = _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(int64_t(0x8040201008040201ull)), blocks, 0);
  return _mm512_permutexvar_epi8(_mm512_load_si512(kInterleave), t);
}

// SlotWindowsFn: per row, each aligned 16-column word's slot bits (slot_bits16).
// The ids' maximum is taken on the way, so the caller need not read them again
// to check them, and ids past the image's sets gather nothing.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,gfni"))) uint16_t slot_windows_avx512(
    const uint16_t* sets, int64_t sh, int64_t sw, const uint64_t* set_slots, int64_t nsets, int G,
    uint16_t* windows) {
  const int64_t nwin = slot_window_count(sw);
  const __m512i limit = _mm512_set1_epi32(int(std::min<int64_t>(nsets, 65536)));
  __m512i top = _mm512_setzero_si512();
  for (int64_t r = 0; r < sh; ++r) {
    const uint16_t* ids_row = sets + r * sw;
    uint16_t* out = windows + r * (32 * G);
    // The ids 4 rows on: the batch's labels come from memory, and the loads
    // of each row's ids stalled the build (-45 us per 64-image batch).
    if (r + 4 < sh)
      for (int64_t x = 0; x < sw; x += 32) __builtin_prefetch(ids_row + 4 * sw + x, 0, 3);
    for (int64_t w = 0; w < nwin; ++w) {
      const int64_t n = sw - 16 * w < 16 ? sw - 16 * w : 16;
      const __mmask16 live = __mmask16(n == 16 ? 0xffffu : (1u << n) - 1u);
      const __m512i ids = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, ids_row + 16 * w));
      top = _mm512_max_epu32(top, ids);
      const __mmask16 valid = _mm512_mask_cmplt_epu32_mask(live, ids, limit);
      for (int g = 0; g < G; ++g)
        _mm512_storeu_si512(out + (w * sh * G + g) * 32, slot_bits16(valid, ids, set_slots, g));
    }
  }
  return uint16_t(_mm512_reduce_max_epu32(top));
}

// count_span_avx512's walk for AVX2 (no mask registers): a 16-pixel chunk is two
// 8-lane halves, and a row's mask is kept as 2 bits per pixel (the movemask of
// 16-bit lanes), which is also the layout of the set-id compares.
struct Chunk16 {
  __m256 u0, u1, v0, v1;  // lanes past the span's end hold 0 and are masked by `live`
  uint32_t live;          // 2 bits per live pixel
};

__attribute__((target("avx2,fma,popcnt"), always_inline)) inline uint32_t mask16_of(__m256 lo, __m256 hi) {
  const __m256i both = _mm256_packs_epi32(_mm256_castps_si256(lo), _mm256_castps_si256(hi));
  return uint32_t(_mm256_movemask_epi8(_mm256_permute4x64_epi64(both, 0xD8)));  // back to pixel order
}

// One row of a walk (walk_rows): false when every lane is <= skip.
__attribute__((target("avx2,fma,popcnt"), always_inline)) inline bool walk_row_avx2(
    const Chunk16& c, const AxisWeight& wy, __m256 t, __m256 sk, const uint16_t* p, int64_t n, int64_t& M,
    int32_t* cnt, int32_t* touched, int64_t& nt) {
  const __m256 a = _mm256_set1_ps(wy.w0), b = _mm256_set1_ps(wy.w1);
  const __m256 lo = _mm256_fmadd_ps(a, c.u0, _mm256_mul_ps(b, c.v0));
  const __m256 hi = _mm256_fmadd_ps(a, c.u1, _mm256_mul_ps(b, c.v1));
  if (!(mask16_of(_mm256_cmp_ps(lo, sk, _CMP_GT_OQ), _mm256_cmp_ps(hi, sk, _CMP_GT_OQ)) & c.live)) return false;
  uint32_t w = mask16_of(_mm256_cmp_ps(lo, t, _CMP_GT_OQ), _mm256_cmp_ps(hi, t, _CMP_GT_OQ)) & c.live;
  if (!w) return true;
  M += __builtin_popcount(w) >> 1;
  alignas(32) uint16_t tail[16];
  const uint16_t* q = p;
  if (n < 16) {  // the span's last chunk: its ids end with the row (lanes past n are masked off)
    std::memset(tail, 0, sizeof(tail));
    std::memcpy(tail, p, size_t(n) * sizeof(uint16_t));
    q = tail;
  }
  const __m256i ids = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
  do {
    const uint16_t s = q[__builtin_ctz(w) >> 1];
    const uint32_t eq = uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi16(ids, _mm256_set1_epi16(short(s))))) & w;
    w &= ~eq;
    add_set_pixels(s, __builtin_popcount(eq) >> 1, cnt, touched, nt);
  } while (w);
  return true;
}

__attribute__((target("avx2,fma,popcnt"))) int64_t count_span_avx2(
    const float* top, const float* bot, const AxisWeight* wy, int64_t rows, float T, float skip, int64_t xa,
    int64_t xb, const uint16_t* sets, int64_t sw, int32_t* cnt, int32_t* touched, int64_t* ntouched) {
  const __m256 t = _mm256_set1_ps(T), sk = _mm256_set1_ps(skip);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t M = 0, nt = *ntouched;
  for (int64_t px = xa; px < xb; px += 16) {
    const int64_t n = xb - px < 16 ? xb - px : 16;
    const __m256i in0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lane);
    const __m256i in1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n) - 8), lane);
    Chunk16 c{_mm256_maskload_ps(top + px, in0), _mm256_maskload_ps(top + px + 8, in1),
              _mm256_maskload_ps(bot + px, in0), _mm256_maskload_ps(bot + px + 8, in1),
              n == 16 ? 0xffffffffu : (1u << (2 * n)) - 1u};
    const bool top_hot = mask16_of(_mm256_cmp_ps(c.u0, sk, _CMP_GT_OQ), _mm256_cmp_ps(c.u1, sk, _CMP_GT_OQ)) & c.live;
    const bool bot_hot = mask16_of(_mm256_cmp_ps(c.v0, sk, _CMP_GT_OQ), _mm256_cmp_ps(c.v1, sk, _CMP_GT_OQ)) & c.live;
    walk_rows(rows, top_hot, bot_hot, [&](int64_t r) __attribute__((target("avx2,fma,popcnt"))) {
      return walk_row_avx2(c, wy[r], t, sk, sets + r * sw + px, n, M, cnt, touched, nt);
    });
  }
  *ntouched = nt;
  return M;
}

__attribute__((target("avx512f"))) int64_t append_greater_avx512(const float* v, int64_t n, float bound,
                                                                  float* out, int64_t count) {
  const __m512 b = _mm512_set1_ps(bound);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    const __mmask16 m = _mm512_cmp_ps_mask(x, b, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_ps(out + count, m, x);
    count += __builtin_popcount(unsigned(m));
  }
  if (i < n) {
    const __mmask16 live = __mmask16((1u << (n - i)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(live, v + i);
    const __mmask16 m = _mm512_mask_cmp_ps_mask(live, x, b, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_ps(out + count, m, x);
    count += __builtin_popcount(unsigned(m));
  }
  return count;
}

// One pass per map: compare against the unit's bound (and classify for NaN/Inf)
// while loading; a map holding a value above the bound has its qualifying values
// compressed into the tail. NV > 0: maps of at most 16 * NV values, kept in registers;
// NV == 0: any size, a hot map is read again (from L1).
template <int NV>
__attribute__((target("avx512f,avx512dq"))) inline int64_t scan_append_avx512_impl(
    const float* base, int64_t count, int64_t stride, int64_t n, const float* bound, float* tails, int64_t tstride,
    int64_t* held, int64_t limit, float* mx, bool* bad) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const int64_t full = NV > 0 ? 16 * (NV - 1) : n & ~int64_t(15);
  const __mmask16 tail = __mmask16(n - full >= 16 ? 0xffffu : (1u << (n - full)) - 1u);
  constexpr int kNonFinite = 0x01 | 0x08 | 0x10 | 0x80;  // QNaN, +Inf, -Inf, SNaN
  constexpr int64_t kAhead = 16;  // maps; hardware prefetchers alone leave a thread at ~half the bandwidth
  __mmask16 nonfinite = 0;
  int64_t i = 0;
  while (i < count) {
    const float* v = base + i * stride;
    if (i + kAhead < count) {
      const char* p = reinterpret_cast<const char*>(v + kAhead * stride);
      for (int64_t off = 0; off < n * 4; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
      // and the end of that map's tail, where a hit would store (last written an
      // image ago, or never)
      const char* t = reinterpret_cast<const char*>(tails + (i + kAhead) * tstride + held[i + kAhead]);
      _mm_prefetch(t, _MM_HINT_T0);
      _mm_prefetch(t + 60, _MM_HINT_T0);
    }
    const __m512 b = _mm512_set1_ps(bound[i]);
    constexpr int R = NV > 0 ? NV : 1;
    __m512 x[R];
    __mmask16 k[R];
    __mmask16 hot = 0;
    __m512 m = ninf;
    if constexpr (NV > 0) {
      for (int j = 0; j < NV; ++j) {
        const __mmask16 live = j == NV - 1 ? tail : __mmask16(0xffff);
        x[j] = _mm512_maskz_loadu_ps(live, v + 16 * j);
        k[j] = _mm512_mask_cmp_ps_mask(live, x[j], b, _CMP_GT_OQ);
        nonfinite |= _mm512_mask_fpclass_ps_mask(live, x[j], kNonFinite);
        hot |= k[j];
        if (mx) m = _mm512_mask_max_ps(m, live, m, x[j]);
      }
    } else {
      for (int64_t j = 0; j < full; j += 16) {
        const __m512 y = _mm512_loadu_ps(v + j);
        hot |= _mm512_cmp_ps_mask(y, b, _CMP_GT_OQ);
        nonfinite |= _mm512_fpclass_ps_mask(y, kNonFinite);
        if (mx) m = _mm512_max_ps(m, y);
      }
      if (tail) {
        const __m512 y = _mm512_maskz_loadu_ps(tail, v + full);
        hot |= _mm512_mask_cmp_ps_mask(tail, y, b, _CMP_GT_OQ);
        nonfinite |= _mm512_mask_fpclass_ps_mask(tail, y, kNonFinite);
        if (mx) m = _mm512_mask_max_ps(m, tail, m, y);
      }
    }
    if (mx) mx[i] = _mm512_reduce_max_ps(m);
    ++i;
    if (!hot) continue;
    float* out = tails + (i - 1) * tstride;
    int64_t c = held[i - 1];
    if constexpr (NV > 0) {
      // Masked stores: a full-width store would touch the next, cold line of the
      // tail on most hits (a hit appends ~4 values).
      for (int j = 0; j < NV; ++j) {
        _mm512_mask_compressstoreu_ps(out + c, k[j], x[j]);
        c += __builtin_popcount(unsigned(k[j]));
      }
    } else {
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 live = j < full ? __mmask16(0xffff) : tail;
        const __m512 y = _mm512_maskz_loadu_ps(live, v + j);
        const __mmask16 q = _mm512_mask_cmp_ps_mask(live, y, b, _CMP_GT_OQ);
        _mm512_mask_compressstoreu_ps(out + c, q, y);
        c += __builtin_popcount(unsigned(q));
      }
    }
    held[i - 1] = c;
    if (c > limit) break;
  }
  *bad = nonfinite != 0;
  return i;
}

__attribute__((target("avx512f,avx512dq"))) int64_t scan_append_avx512(const float* base, int64_t count,
                                                                       int64_t stride, int64_t n, const float* bound,
                                                                       float* tails, int64_t tstride, int64_t* held,
                                                                       int64_t limit, float* mx, bool* bad) {
  switch ((n + 15) / 16) {  // 7x7 .. 8x8 maps: 4 vectors
    case 1:
      return scan_append_avx512_impl<1>(base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
    case 2:
      return scan_append_avx512_impl<2>(base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
    case 3:
      return scan_append_avx512_impl<3>(base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
    case 4:
      return scan_append_avx512_impl<4>(base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
    default:
      return scan_append_avx512_impl<0>(base, count, stride, n, bound, tails, tstride, held, limit, mx, bad);
  }
}

#endif

struct Dispatch {
  AppendGreaterFn append = append_greater_scalar;
  ScanAppendFn scan_append = scan_append_scalar;
  InterpRowFn interp = interp_row_scalar;
  ScanMapsFn maps = scan_maps_scalar;
  SelectTopFn select = select_top_scalar;
  HotRowsFn hot = hot_rows_scalar;
  CountSpanFn count = count_span_walk;
  CountMapFn count_map = nullptr;
  CountMapSlotsFn count_map_slots[kMaxSlotGroups] = {};
  SlotWindowsFn slot_windows = nullptr;
  const char* name = "baseline";
  Dispatch() {
#ifdef NDF_X86
    // NDF_CPU_ISA=avx512-sets|avx2|baseline caps the choice (tests run every variant this way);
    // avx512-sets keeps the set counter where the slot counter would run.
    const char* cap = std::getenv("NDF_CPU_ISA");
    const bool sets_only = cap && std::strcmp(cap, "avx512-sets") == 0;
    const bool allow512 = !cap || std::strcmp(cap, "avx512") == 0 || sets_only;
    const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
    __builtin_cpu_init();
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) {
      append = append_greater_avx512;
      scan_append = scan_append_avx512;
      interp = interp_row_avx512;
      maps = scan_maps_avx512;
      select = select_top_avx512;
      hot = hot_rows_avx512;
      const bool bw = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
      count = bw ? count_span_avx512 : count_span_walk;
      count_map = bw ? count_map_avx512 : nullptr;
      if (bw && __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("avx512vbmi") &&
          __builtin_cpu_supports("gfni") && !sets_only) {
        count_map_slots[0] = count_map_slots_avx512<1>;
        count_map_slots[1] = count_map_slots_avx512<2>;
        slot_windows = slot_windows_avx512;
      }
      name = "avx512";
    } else if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      interp = interp_row_avx2;
      maps = scan_maps_avx2;
      scan_append = scan_append_avx2;
      count = count_span_avx2;
      hot = hot_rows_avx2;
      name = "avx2";
    }
#endif
  }
};

const Dispatch& dispatch() {
  static const Dispatch d;
  return d;
}

}  // namespace

AppendGreaterFn append_greater() { return dispatch().append; }
InterpRowFn interp_row() { return dispatch().interp; }
ScanMapsFn scan_maps() { return dispatch().maps; }
ScanAppendFn scan_append() { return dispatch().scan_append; }
SelectTopFn select_top() { return dispatch().select; }
HotRowsFn hot_rows() { return dispatch().hot; }
CountSpanFn count_span() { return dispatch().count; }
CountMapFn count_map_fused() { return dispatch().count_map; }
CountMapSlotsFn count_map_slots(int groups) {
  return groups >= 1 && groups <= kMaxSlotGroups ? dispatch().count_map_slots[groups - 1] : nullptr;
}
SlotWindowsFn slot_windows() { return dispatch().slot_windows; }
const char* cpu_isa_name() { return dispatch().name; }

}  // namespace ndf
