// SIMD helpers of the CPU backend, chosen once at run time (cpu_features.cc).
#pragma once
#include <cstdint>

namespace ndf {

using AppendGreaterFn = int64_t (*)(const float* v, int64_t n, float bound, float* out, int64_t count);
AppendGreaterFn append_greater();

}  // namespace ndf
