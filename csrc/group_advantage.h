// Group-wise advantage: shared declarations between the C++ bindings and the CUDA launcher.
// This header includes no torch headers so that the .cu file compiles with a plain nvcc.
#pragma once

#include <cstdint>

namespace zreward {

// Advantage modes (the Python API's mode strings map onto these).
enum AdvMode : int { kStd = 0, kMean = 1, kRloo = 2 };

// Input dtypes the CUDA launcher accepts.
enum DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

#if defined(__CUDACC__)
#define ZREWARD_HD __host__ __device__
#else
#define ZREWARD_HD
#endif

// The per-group factor every backend multiplies a member's deviation from the group mean by:
// std -> 1 / (std + eps) (unbiased std), mean -> 1 (Dr. GRPO), rloo -> n / (n - 1)
// (r - mean of the others = (r - mean) * n / (n - 1)); a group of one (or none) gets 0 in every mode,
// and so does a group with std + eps == 0 (all rewards equal with eps = 0: 0, not 0/0 = NaN).
inline ZREWARD_HD double advantage_scale(int64_t n, double sd, int mode, double eps) {
  if (n <= 1) return 0.0;
  if (mode == kStd) return sd + eps > 0.0 ? 1.0 / (sd + eps) : 0.0;
  if (mode == kMean) return 1.0;
  return static_cast<double>(n) / static_cast<double>(n - 1);
}

#ifdef ZREWARD_WITH_CUDA
// Launches the CUDA kernels on `stream` (a cudaStream_t passed as void*).
// rewards: M values of `in_dtype`; offsets: G+1 int64 (nullptr for fixed groups of `group_size`).
// adv/mean/std: float64 outputs when in_dtype == kFloat64, else float32; zero_std: G bytes (bool).
// Returns a cudaError_t as int (0 = success).
int group_advantage_cuda_launch(const void* rewards, int in_dtype, const int64_t* offsets, int64_t M, int64_t G,
                                int64_t group_size, int mode, double eps, void* adv, void* mean, void* stdv,
                                bool* zero_std, void* stream);

// Launch tuning (process-wide, read at each launch):
// elems: members each lane of a segment visits for the typical group size, a power of two in 1..32
//   (1 = one lane per member, the default);
// kernel: which segment kernel runs groups below 1024 members: 1 (the first kernel, the default) or
//   2 (full-warp shuffles, members in registers, a ballot for zero_std; see group_advantage_cuda.cu).
// Returns 0, or -1 for a value out of range (nothing changed).
int group_advantage_cuda_set_config(int elems, int kernel);
int group_advantage_cuda_elems_per_lane();
int group_advantage_cuda_kernel();
#endif

}  // namespace zreward
