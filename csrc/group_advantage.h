// Group-wise advantage: shared declarations between the C++ bindings and the CUDA launcher.
// This header includes no torch headers so that the .cu file compiles with a plain nvcc.
#pragma once

#include <cstdint>

namespace zreward {

// Advantage modes (the Python API's mode strings map onto these).
enum AdvMode : int { kStd = 0, kMean = 1, kRloo = 2 };

// Input dtypes the CUDA launcher accepts.
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

#ifdef ZREWARD_WITH_CUDA
// Launches the CUDA kernels on `stream` (a cudaStream_t passed as void*).
// rewards: M values of `in_dtype`; offsets: G+1 int64 (nullptr for fixed groups of `group_size`).
// adv/mean/std: float64 outputs when in_dtype == kFloat64, else float32; zero_std: G bytes (bool).
// Returns a cudaError_t as int (0 = success).
int group_advantage_cuda_launch(const void* rewards, int in_dtype, const int64_t* offsets, int64_t M, int64_t G,
                                int64_t group_size, int mode, double eps, void* adv, void* mean, void* stdv,
                                bool* zero_std, void* stream);

// Launch tuning (process-wide, read at each launch): members each lane of a segment visits for the
// typical group size, a power of two in 1..32 (1 = one lane per member, the default).  Returns 0, or
// -1 for a value out of range (left unchanged).
int group_advantage_cuda_set_elems_per_lane(int elems);
int group_advantage_cuda_elems_per_lane();
#endif

}  // namespace zreward
