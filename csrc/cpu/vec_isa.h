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
