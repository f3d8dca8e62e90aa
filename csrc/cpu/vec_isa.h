// The float vectors of the CPU attention kernels (cpu/attention_isa.h, the forward, and
// cpu/attention_backward_isa.h), part of each ISA body: compiled once per instruction set with
// it (cpu/isa_dispatch.h), so no include guard and no includes.

// The register tile: MR rows by NC vectors of VS floats, as many accumulators as the ISA's
// vector registers hold beside the operands (32 zmm: 4 x 4; 16 ymm: 6 x 2; 16 xmm: 4 x 2).
constexpr int VS = kVectorBytes / 4;
constexpr int MR = VS == 8 ? 6 : 4;
constexpr int NC = VS == 16 ? 4 : 2;

typedef float vf __attribute__((vector_size(VS * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VS * 4), aligned(4)));

constexpr int64_t kCols = VS * NC;  // columns of one register tile

static inline vf splat(float x) { return vf{} + x; }
static inline vf loadv(const float* p) { return *reinterpret_cast<const vf*>(p); }
static inline void storev(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
// a > b ? a : b (one max instruction): a NaN in b comes out, a NaN in a does not.
static inline vf vmax(vf a, vf b) {
  const vi m = a > b;
  return (vf)(((vi)a & m) | ((vi)b & ~m));
}

// e^f * 2^n for f in [-ln2/2, ln2/2] and an integral n, ~1 ulp, 0 where `under` is set: the end
// both exponentials of the attention kernels share (the forward's exp2v and the backward's
// expv differ only in how they reduce x to f and n).
static inline vf exp_poly(vf f, vf n, vi under) {
  vf p = splat(1.f / 5040.f);
  p = p * f + (1.f / 720.f);
  p = p * f + (1.f / 120.f);
  p = p * f + (1.f / 24.f);
  p = p * f + (1.f / 6.f);
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return (vf)((vi)(p * (vf)e) & ~under);
}
