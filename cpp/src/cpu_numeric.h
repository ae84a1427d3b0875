// float32 <-> bfloat16 for the CPU model kernels (linear, attention, per-layer ops): bf16 widens
// exactly; float32 rounds to the nearest even bf16, NaN kept quiet. dtype codes as the C ABI's.
#pragma once

#include <cstdint>
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

}  // namespace cpu
}  // namespace redrafter
