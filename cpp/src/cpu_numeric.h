// Shared by the CPU model kernels (linear, attention, per-layer ops, machine probes): float32 <->
// bfloat16 (bf16 widens exactly; float32 rounds to the nearest even bf16, NaN kept quiet), the
// dtype codes of the C ABI, and the run-time checks of the SIMD paths.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace redrafter {
namespace cpu {

constexpr int32_t kF32 = 0;
constexpr int32_t kBF16 = 2;

inline float bf16ToF32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32ToBf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

#if defined(__x86_64__) || defined(__i386__)
// AVX2 + FMA: the 8-lane paths.
inline bool haveAvx2Fma() {
    static const bool v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return v;
}

// AVX-512F: the 16-lane paths; $REDRAFTER_NO_AVX512 keeps AVX2 (tests compare both paths).
inline bool haveAvx512() {
    static const bool v = __builtin_cpu_supports("avx512f") && std::getenv("REDRAFTER_NO_AVX512") == nullptr;
    return v;
}
#endif

}  // namespace cpu
}  // namespace redrafter
