// Hot CPU loops are compiled for baseline x86-64 and for x86-64-v3 (AVX2, FMA, F16C), and the
// loader picks the best one the CPU has: vector code without building for one machine.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define VIDSTREAM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VIDSTREAM_MULTIVERSION
#endif

// Helpers called from a VIDSTREAM_MULTIVERSION function must be inlined into it: compiled out
// of line they keep the baseline target and the clone gains nothing.
#if defined(__GNUC__) || defined(__clang__)
#define VIDSTREAM_INLINE inline __attribute__((always_inline))
#else
#define VIDSTREAM_INLINE inline
#endif
