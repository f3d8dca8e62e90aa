// The hot loops of the CPU rope3d and rope3d_shift_ (csrc/cpu/rope3d.cpp), compiled once per
// instruction set by cpu/isa_dispatch.h: float32 arithmetic over a run of tokens, rotation
// angles from the float64-built tables. No include guard and no includes (see isa_dispatch.h).

#ifndef VIDSTREAM_INLINE
// The helpers are inlined into the entry points: the loop bodies then vectorize as one.
#define VIDSTREAM_INLINE inline __attribute__((always_inline))
#endif

// Conversions to and from float32. c10's bfloat16 rounding branches on NaN, which keeps the
// compiler from vectorizing the loop; this select-based version rounds to nearest even with the
// same results, NaN included.
template <typename T>
struct Convert {
  static VIDSTREAM_INLINE float load(T v) { return static_cast<float>(v); }
  static VIDSTREAM_INLINE T store(float f) { return static_cast<T>(f); }
};
template <>
struct Convert<c10::BFloat16> {
  static VIDSTREAM_INLINE float load(c10::BFloat16 v) {
    const uint32_t u = static_cast<uint32_t>(v.x) << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof(f));
    return f;
  }
  static VIDSTREAM_INLINE c10::BFloat16 store(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, sizeof(u));
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = f != f ? 0x7FC0u : r;
    return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
  }
};

VIDSTREAM_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Rotates n adjacent pairs (x[2p], x[2p+1]) by the (cos, sin) pairs of `cs`. The pairs go
// through local float buffers: in place (src == dst) a direct loop would fail the compiler's
// run-time overlap check and fall back to scalar code.
template <typename T>
VIDSTREAM_INLINE void rotate_pairs(const T* src, T* dst, const float* __restrict__ cs, int64_t n) {
  using C = Convert<T>;
  constexpr int64_t kChunk = 64;
  float a[kChunk], b[kChunk];
  for (int64_t p0 = 0; p0 < n; p0 += kChunk) {
    const int64_t m = imin(kChunk, n - p0);
    const T* s = src + 2 * p0;
    const float* t = cs + 2 * p0;
    for (int64_t p = 0; p < m; ++p) {
      a[p] = C::load(s[2 * p]);
      b[p] = C::load(s[2 * p + 1]);
    }
    T* d = dst + 2 * p0;
    for (int64_t p = 0; p < m; ++p) {
      d[2 * p] = C::store(a[p] * t[2 * p] - b[p] * t[2 * p + 1]);
      d[2 * p + 1] = C::store(a[p] * t[2 * p + 1] + b[p] * t[2 * p]);
    }
  }
}

// One token, every head: the three bands, each with its own row of the tables.
template <typename T>
VIDSTREAM_INLINE void rope3d_token(const T* src, T* dst, int64_t heads, int64_t src_stride_h,
                                   int64_t dst_stride_h, int64_t head_dim, RopeBands bands,
                                   const float* cs_t, int64_t cs_t_head_stride,
                                   const float* cs_h, const float* cs_w) {
  const int64_t o_h = 2 * bands.c_t, o_w = 2 * (bands.c_t + bands.c_h);
  const int64_t o_end = 2 * (bands.c_t + bands.c_h + bands.c_w);
  for (int64_t h = 0; h < heads; ++h) {
    const T* s = src + h * src_stride_h;
    T* d = dst + h * dst_stride_h;
    rotate_pairs(s, d, cs_t + h * cs_t_head_stride, bands.c_t);
    rotate_pairs(s + o_h, d + o_h, cs_h, bands.c_h);
    rotate_pairs(s + o_w, d + o_w, cs_w, bands.c_w);
    for (int64_t k = o_end; k < head_dim; ++k) d[k] = s[k];
  }
}

// Tokens [begin, end) of the flattened (batch, token) index.
template <typename T>
void rope3d_rows_t(const Rope3dRows& a, int64_t begin, int64_t end) {
  const RopeBands bands = a.bands;
  const int64_t L = a.tokens, hw = a.height * a.width, width = a.width;
  const T* xp = static_cast<const T*>(a.x);
  T* op = static_cast<T*>(a.out);
  for (int64_t n = begin; n < end; ++n) {
    const int64_t b = n / L, i = n % L;
    const int64_t f = i / hw, y = (i % hw) / width, c = i % width;
    rope3d_token(xp + b * a.sxb + i * a.sxl, op + b * a.sob + i * a.sol, a.heads, a.sxh, a.soh,
                 a.head_dim, bands, a.table_t + f * a.t_heads * bands.c_t * 2,
                 a.t_heads > 1 ? bands.c_t * 2 : 0, a.table_h + y * bands.c_h * 2,
                 a.table_w + c * bands.c_w * 2);
  }
}

// Rotates the n2 (even) interleaved values of x in place: out[k] = x[k] cc[k] + x[k^1] ss[k],
// with cc = (c0, c0, c1, c1, ...) and ss = (-s0, s0, -s1, s1, ...). Unlike the pair loop this
// form has no de-interleave, so the whole band runs as full-width vector code.
template <typename T>
VIDSTREAM_INLINE void rotate_interleaved(T* x, const float* __restrict__ cc,
                                         const float* __restrict__ ss, int64_t n2) {
  using C = Convert<T>;
  constexpr int64_t kChunk = 128;
  float buf[kChunk];
  for (int64_t k0 = 0; k0 < n2; k0 += kChunk) {
    const int64_t m = imin(kChunk, n2 - k0);
    T* xs = x + k0;
    for (int64_t k = 0; k < m; ++k) buf[k] = C::load(xs[k]);
    const float* c = cc + k0;
    const float* s = ss + k0;
    for (int64_t k = 0; k < m; k += 2) {
      xs[k] = C::store(buf[k] * c[k] + buf[k + 1] * s[k]);
      xs[k + 1] = C::store(buf[k + 1] * c[k + 1] + buf[k] * s[k + 1]);
    }
  }
}

// One token of a range, every head: the temporal band only, in place. The band is a few cache
// lines out of each head row, a pattern the hardware prefetcher follows poorly, so the same
// lines of a token `ahead` strides later are requested now.
template <typename T>
VIDSTREAM_INLINE void shift_token(T* x, int64_t heads, int64_t stride_h, const float* cc,
                                  const float* ss, int64_t head_stride, int64_t c_t,
                                  int64_t ahead) {
  const int64_t band_bytes = 2 * c_t * static_cast<int64_t>(sizeof(T));
  for (int64_t h = 0; h < heads; ++h) {
    const char* next = reinterpret_cast<const char*>(x + h * stride_h + ahead);
    for (int64_t off = 0; off < band_bytes; off += 64) __builtin_prefetch(next + off, 1, 3);
    rotate_interleaved(x + h * stride_h, cc + h * head_stride, ss + h * head_stride, 2 * c_t);
  }
}

// Items [begin, end) of the flattened (batch, token of the ranges) index.
template <typename T>
void shift_rows_t(const ShiftRows& a, int64_t begin, int64_t end) {
  constexpr int64_t kPrefetchTokens = 4;
  T* pp = static_cast<T*>(a.pool);
  const int64_t total = a.offsets[a.num_ranges], sl = a.stride_l, c_t = a.c_t;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t b = n / total, k = n % total;
    // The range of item k: the last r with offsets[r] <= k.
    int64_t lo = 0, hi = a.num_ranges;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (a.offsets[mid] <= k) lo = mid;
      else hi = mid;
    }
    const int64_t r = lo;
    const int64_t i = a.ranges[r].first + (k - a.offsets[r]);
    const int64_t row = r * a.t_heads * c_t * 2;
    // Prefetch only inside the range: past its end the lines belong to no work.
    const int64_t ahead = i + kPrefetchTokens < a.ranges[r].second ? kPrefetchTokens * sl : 0;
    shift_token(pp + b * a.stride_b + i * sl, a.heads, a.stride_h, a.cc + row, a.ss + row,
                a.t_heads > 1 ? c_t * 2 : 0, c_t, ahead);
  }
}

// Non-template entry points, so that every instantiation above happens inside this ISA.
void rope3d_rows(const Rope3dRows& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case at::kFloat: return rope3d_rows_t<float>(a, begin, end);
    case at::kHalf: return rope3d_rows_t<c10::Half>(a, begin, end);
    default: return rope3d_rows_t<c10::BFloat16>(a, begin, end);
  }
}

void shift_rows(const ShiftRows& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case at::kFloat: return shift_rows_t<float>(a, begin, end);
    case at::kHalf: return shift_rows_t<c10::Half>(a, begin, end);
    default: return shift_rows_t<c10::BFloat16>(a, begin, end);
  }
}

const IsaKernels kKernels = {&rope3d_rows, &shift_rows};
