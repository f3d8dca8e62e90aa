// The one way CPU kernels get vector code without building for one machine: the hot part of a
// kernel (its "ISA body", a header) is compiled once per instruction set, each copy in its own
// namespace, and the best copy the CPU runs is picked once, at the first call. A kernel file
// declares `struct IsaKernels` (the body's entry points, as function pointers), names its body
// and includes this header inside an anonymous namespace:
//
//   #define VIDSTREAM_ISA_BODY "cpu/rope3d_isa.h"  // must define `const IsaKernels kKernels`
//   #define VIDSTREAM_ISA_AVX512 0                 // 1: also compile an AVX-512 copy
//   #include "cpu/isa_dispatch.h"
//   ... isa_kernels().fn(...)  // outside the hot loop: the choice is made once
//
// Each copy sees `constexpr int kVectorBytes` (64, 32 or 16) for its per-ISA constants. Why
// target pragmas and not target_clones: a body can hold such constants, and its hot loop, not
// one call per element, decides the ISA. The body must not instantiate templates defined
// outside it (std ones included): an instantiation would carry the ISA of its first use, and the
// linker could hand that copy to baseline code. No include guard: included once per kernel file.

#if !defined(VIDSTREAM_ISA_BODY) || !defined(VIDSTREAM_ISA_AVX512)
#error "define VIDSTREAM_ISA_BODY and VIDSTREAM_ISA_AVX512 before including cpu/isa_dispatch.h"
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define VIDSTREAM_X86_ISAS 1
#endif

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// What this CPU runs, asked once (defined, like everything here, in the includer's namespace).
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#ifdef VIDSTREAM_X86_ISAS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return isa;
}

// Target pragmas: GCC's push/pop, clang's attribute push/pop.
#define VIDSTREAM_ISA_STR(x) #x
#if defined(__clang__)
#define VIDSTREAM_ISA_PUSH(isa)                                                   \
  _Pragma(VIDSTREAM_ISA_STR(clang attribute push(__attribute__((target(isa))), \
                                                 apply_to = function)))
#define VIDSTREAM_ISA_POP _Pragma("clang attribute pop")
#else
#define VIDSTREAM_ISA_PUSH(isa) \
  _Pragma("GCC push_options") _Pragma(VIDSTREAM_ISA_STR(GCC target(isa)))
#define VIDSTREAM_ISA_POP _Pragma("GCC pop_options")
#endif

#ifdef VIDSTREAM_X86_ISAS
#if VIDSTREAM_ISA_AVX512
VIDSTREAM_ISA_PUSH("avx512f,avx512dq,avx512bw,avx512vl,fma")
namespace isa_avx512 {
constexpr int kVectorBytes = 64;
#include VIDSTREAM_ISA_BODY
}  // namespace isa_avx512
VIDSTREAM_ISA_POP
#endif
VIDSTREAM_ISA_PUSH("avx2,fma,f16c")
namespace isa_avx2 {
constexpr int kVectorBytes = 32;
#include VIDSTREAM_ISA_BODY
}  // namespace isa_avx2
VIDSTREAM_ISA_POP
#endif

namespace isa_baseline {
constexpr int kVectorBytes = 16;
#include VIDSTREAM_ISA_BODY
}  // namespace isa_baseline

// The entry points of the best copy this CPU runs.
inline const IsaKernels& isa_kernels() {
#ifdef VIDSTREAM_X86_ISAS
#if VIDSTREAM_ISA_AVX512
  if (cpu_isa() == CpuIsa::kAvx512) return isa_avx512::kKernels;
#endif
  if (cpu_isa() >= CpuIsa::kAvx2) return isa_avx2::kKernels;
#endif
  return isa_baseline::kKernels;
}

#undef VIDSTREAM_ISA_PUSH
#undef VIDSTREAM_ISA_POP
#undef VIDSTREAM_ISA_STR
#undef VIDSTREAM_ISA_BODY
#undef VIDSTREAM_ISA_AVX512
#undef VIDSTREAM_X86_ISAS
