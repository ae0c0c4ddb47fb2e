// CUDA kernels for the group-wise advantage.  No torch headers: the binding passes raw pointers.
//
// Each group is handled by a *segment* of L lanes of one warp (L = 1..32, a power of two): small
// fixed groups pack 32/L groups into one warp, variable or medium groups get a whole warp, and
// (tunable: elements per lane) a lane may visit several members;
// large fixed groups (>= 1024) get a block of 256 threads.  Statistics are accumulated in double,
// shifted by the group's first value (exact for 1e6 + small noise), with a second pass for the
// variance.  No atomics: every group is reduced by exactly one segment or block (deterministic).
//
// Two segment kernels (chosen at launch, see group_advantage_cuda_set_config):
// 1. seg_kernel: the first one, measured on an H200 (bench/results/h200*).  A segment past the last
//    group returns early, so its shuffles use partial masks; zero_std needs min and max reductions;
//    every pass re-reads the members.
// 2. seg_kernel_regs: every lane of the warp takes part in every shuffle (full masks, no early exit),
//    the first kRegs members of each lane stay in registers between the passes (one global read
//    each), zero_std is one ballot of "differs from the first member", and two sums are the only
//    reductions.  Same arithmetic as 1 (double, shifted two-pass, one scale per group).
#define ZREWARD_WITH_CUDA
#include "group_advantage.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace zreward {
namespace {

__device__ __forceinline__ double to_d(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_d(double x) { return x; }
__device__ __forceinline__ double to_d(__half x) { return static_cast<double>(__half2float(x)); }
__device__ __forceinline__ double to_d(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }

struct Acc {
  double s;
  double mn;
  double mx;
};

template <int L>
__device__ __forceinline__ double seg_sum(double v, unsigned mask) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off, L);
  return v;
}

template <int L>
__device__ __forceinline__ double seg_min(double v, unsigned mask) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v = fmin(v, __shfl_xor_sync(mask, v, off, L));
  return v;
}

template <int L>
__device__ __forceinline__ double seg_max(double v, unsigned mask) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(mask, v, off, L));
  return v;
}

// One segment of L lanes per group.
template <typename T, typename O, int L>
__global__ void seg_kernel(const T* __restrict__ r, const int64_t* __restrict__ offsets, int64_t G, int64_t gsize,
                           int mode, double eps, O* __restrict__ adv, O* __restrict__ mean_out,
                           O* __restrict__ std_out, bool* __restrict__ zs_out) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t g = tid / L;
  const int lane = static_cast<int>(threadIdx.x) & (L - 1);
  if (g >= G) return;  // a whole segment leaves together (g is the same for its L lanes)
  const int wl = static_cast<int>(threadIdx.x) & 31;
  const unsigned mask = (L == 32) ? 0xffffffffu : (((1u << L) - 1u) << (wl & ~(L - 1)));
  const int64_t start = offsets ? offsets[g] : g * gsize;
  const int64_t end = offsets ? offsets[g + 1] : start + gsize;
  const int64_t n = end - start;
  if (n <= 0) {
    if (lane == 0) {
      mean_out[g] = O(0);
      std_out[g] = O(0);
      zs_out[g] = true;
    }
    return;
  }
  const double K = to_d(r[start]);
  double s1 = 0.0, mn = INFINITY, mx = -INFINITY;
  for (int64_t i = start + lane; i < end; i += L) {
    const double x = to_d(r[i]);
    s1 += x - K;
    mn = fmin(mn, x);
    mx = fmax(mx, x);
  }
  s1 = seg_sum<L>(s1, mask);
  mn = seg_min<L>(mn, mask);
  mx = seg_max<L>(mx, mask);
  const double shift = s1 / static_cast<double>(n);  // mean - K
  double s2 = 0.0;
  for (int64_t i = start + lane; i < end; i += L) {
    const double dv = (to_d(r[i]) - K) - shift;
    s2 += dv * dv;
  }
  s2 = seg_sum<L>(s2, mask);
  const double sd = n > 1 ? sqrt(s2 / static_cast<double>(n - 1)) : 0.0;
  const double scale = advantage_scale(n, sd, mode, eps);
  for (int64_t i = start + lane; i < end; i += L) {
    const double dv = (to_d(r[i]) - K) - shift;
    adv[i] = static_cast<O>(dv * scale);
  }
  if (lane == 0) {
    mean_out[g] = static_cast<O>(K + shift);
    std_out[g] = static_cast<O>(sd);
    zs_out[g] = (mn == mx);
  }
}

constexpr int kBlock = 256;

__device__ double block_reduce(double v, double* smem, int op) {  // op: 0 sum, 1 min, 2 max
  const unsigned full = 0xffffffffu;
  for (int off = 16; off > 0; off >>= 1) {
    const double o = __shfl_xor_sync(full, v, off);
    v = op == 0 ? v + o : (op == 1 ? fmin(v, o) : fmax(v, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlock / 32 ? smem[lane] : (op == 0 ? 0.0 : (op == 1 ? INFINITY : -INFINITY));
    for (int off = 16; off > 0; off >>= 1) {
      const double o = __shfl_xor_sync(full, v, off);
      v = op == 0 ? v + o : (op == 1 ? fmin(v, o) : fmax(v, o));
    }
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

// One block per group (large fixed groups).
template <typename T, typename O>
__global__ void block_kernel(const T* __restrict__ r, const int64_t* __restrict__ offsets, int64_t gsize, int mode,
                             double eps, O* __restrict__ adv, O* __restrict__ mean_out, O* __restrict__ std_out,
                             bool* __restrict__ zs_out) {
  __shared__ double smem[kBlock / 32];
  const int64_t g = blockIdx.x;
  const int64_t start = offsets ? offsets[g] : g * gsize;
  const int64_t end = offsets ? offsets[g + 1] : start + gsize;
  const int64_t n = end - start;
  if (n <= 0) {
    if (threadIdx.x == 0) {
      mean_out[g] = O(0);
      std_out[g] = O(0);
      zs_out[g] = true;
    }
    return;
  }
  const double K = to_d(r[start]);
  double s1 = 0.0, mn = INFINITY, mx = -INFINITY;
  for (int64_t i = start + threadIdx.x; i < end; i += kBlock) {
    const double x = to_d(r[i]);
    s1 += x - K;
    mn = fmin(mn, x);
    mx = fmax(mx, x);
  }
  s1 = block_reduce(s1, smem, 0);
  mn = block_reduce(mn, smem, 1);
  mx = block_reduce(mx, smem, 2);
  const double shift = s1 / static_cast<double>(n);
  double s2 = 0.0;
  for (int64_t i = start + threadIdx.x; i < end; i += kBlock) {
    const double dv = (to_d(r[i]) - K) - shift;
    s2 += dv * dv;
  }
  s2 = block_reduce(s2, smem, 0);
  const double sd = n > 1 ? sqrt(s2 / static_cast<double>(n - 1)) : 0.0;
  const double scale = advantage_scale(n, sd, mode, eps);
  for (int64_t i = start + threadIdx.x; i < end; i += kBlock) {
    const double dv = (to_d(r[i]) - K) - shift;
    adv[i] = static_cast<O>(dv * scale);
  }
  if (threadIdx.x == 0) {
    mean_out[g] = static_cast<O>(K + shift);
    std_out[g] = static_cast<O>(sd);
    zs_out[g] = (mn == mx);
  }
}

// Members of a lane held in registers by seg_kernel_regs (the rest, for groups longer than
// kRegs * L, are re-read from memory in each pass).
constexpr int kRegs = 4;

template <int L>
__device__ __forceinline__ double full_seg_sum(double v) {  // all 32 lanes call it; sums within segments of L
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off, L);
  return v;
}

template <typename T, typename O, int L>
__global__ void __launch_bounds__(kBlock) seg_kernel_regs(const T* __restrict__ r, const int64_t* __restrict__ offsets,
                                                          int64_t G, int64_t gsize, int mode, double eps,
                                                          O* __restrict__ adv, O* __restrict__ mean_out,
                                                          O* __restrict__ std_out, bool* __restrict__ zs_out) {
  const int64_t g = (static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x) / L;
  const int lane = static_cast<int>(threadIdx.x) & (L - 1);
  const bool active = g < G;  // segments past the last group stay (as empty groups) for the shuffles
  int64_t start = 0, n = 0;
  if (active) {
    start = offsets ? offsets[g] : g * gsize;
    n = (offsets ? offsets[g + 1] : start + gsize) - start;
  }
  const double K = n > 0 ? to_d(r[start]) : 0.0;
  double d[kRegs];  // member - K of this lane's first kRegs members (0 past the group's end)
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    const int64_t i = lane + static_cast<int64_t>(j) * L;
    d[j] = i < n ? to_d(r[start + i]) - K : 0.0;
  }
  double s1 = 0.0;
  bool differs = false;  // x != K  <=>  x - K != 0 (no underflow to 0 for distinct finite values)
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    s1 += d[j];
    differs |= d[j] != 0.0;
  }
  for (int64_t i = lane + static_cast<int64_t>(kRegs) * L; i < n; i += L) {
    const double x = to_d(r[start + i]) - K;
    s1 += x;
    differs |= x != 0.0;
  }
  s1 = full_seg_sum<L>(s1);
  const double shift = n > 0 ? s1 / static_cast<double>(n) : 0.0;  // mean - K
  double s2 = 0.0;
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    const double dv = d[j] - shift;
    if (lane + static_cast<int64_t>(j) * L < n) s2 += dv * dv;
  }
  for (int64_t i = lane + static_cast<int64_t>(kRegs) * L; i < n; i += L) {
    const double dv = (to_d(r[start + i]) - K) - shift;
    s2 += dv * dv;
  }
  s2 = full_seg_sum<L>(s2);
  const unsigned votes = __ballot_sync(0xffffffffu, differs);
  const double sd = n > 1 ? sqrt(s2 / static_cast<double>(n - 1)) : 0.0;
  const double scale = advantage_scale(n, sd, mode, eps);
#pragma unroll
  for (int j = 0; j < kRegs; ++j) {
    const int64_t i = lane + static_cast<int64_t>(j) * L;
    if (i < n) adv[start + i] = static_cast<O>((d[j] - shift) * scale);
  }
  for (int64_t i = lane + static_cast<int64_t>(kRegs) * L; i < n; i += L) {
    adv[start + i] = static_cast<O>(((to_d(r[start + i]) - K) - shift) * scale);
  }
  if (active && lane == 0) {
    const int first = static_cast<int>(threadIdx.x) & 31;  // this segment's first lane in the warp
    const unsigned seg_votes = L == 32 ? votes : (votes >> first) & ((1u << (L & 31)) - 1u);
    mean_out[g] = static_cast<O>(K + shift);
    std_out[g] = static_cast<O>(sd);
    zs_out[g] = seg_votes == 0u;
  }
}

// the defaults of zreward_kernels._tuning.CONFIGS["group_advantage"] (the H200 sweep of 2026-11-27);
// the Python side pushes the table in force when it loads this extension
int g_elems_per_lane = 4;  // see group_advantage_cuda_set_config
int g_kernel = 2;

template <typename T, typename O, int L>
cudaError_t launch_seg(const T* r, const int64_t* offsets, int64_t G, int64_t gsize, int mode, double eps, O* adv,
                       O* mean, O* sd, bool* zs, cudaStream_t stream) {
  const int64_t threads = G * L;
  const unsigned blocks = static_cast<unsigned>((threads + kBlock - 1) / kBlock);
  if (g_kernel == 2) {
    seg_kernel_regs<T, O, L><<<blocks, kBlock, 0, stream>>>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs);
  } else {
    seg_kernel<T, O, L><<<blocks, kBlock, 0, stream>>>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs);
  }
  return cudaGetLastError();
}

template <typename T, typename O>
cudaError_t dispatch(const T* r, const int64_t* offsets, int64_t M, int64_t G, int64_t gsize, int mode, double eps,
                     O* adv, O* mean, O* sd, bool* zs, cudaStream_t stream) {
  if (G == 0) return cudaSuccess;
  // typical group size: the fixed size, or the average M / G for variable groups (known from the shapes, so
  // no host sync); a segment loops over members beyond its lanes, so any actual size is handled
  const int64_t typical = offsets == nullptr ? gsize : (M + G - 1) / G;
  if (typical >= 1024) {
    block_kernel<T, O><<<static_cast<unsigned>(G), kBlock, 0, stream>>>(r, offsets, gsize, mode, eps, adv, mean, sd,
                                                                        zs);
    return cudaGetLastError();
  }
  // lanes per group: the smallest power of two >= typical / elems-per-lane (each lane then visits about
  // elems-per-lane members: more work per thread, fewer shuffle steps), capped at a warp
  const int64_t want = (typical + g_elems_per_lane - 1) / g_elems_per_lane;
  int lanes = 1;
  while (lanes < want && lanes < 32) lanes <<= 1;
  switch (lanes) {
    case 1: return launch_seg<T, O, 1>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs, stream);
    case 2: return launch_seg<T, O, 2>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs, stream);
    case 4: return launch_seg<T, O, 4>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs, stream);
    case 8: return launch_seg<T, O, 8>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs, stream);
    case 16: return launch_seg<T, O, 16>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs, stream);
    default: return launch_seg<T, O, 32>(r, offsets, G, gsize, mode, eps, adv, mean, sd, zs, stream);
  }
}

}  // namespace

int group_advantage_cuda_set_config(int elems, int kernel) {
  if (elems < 1 || elems > 32 || (elems & (elems - 1)) != 0 || (kernel != 1 && kernel != 2)) return -1;
  g_elems_per_lane = elems;
  g_kernel = kernel;
  return 0;
}

int group_advantage_cuda_elems_per_lane() { return g_elems_per_lane; }

int group_advantage_cuda_kernel() { return g_kernel; }

int group_advantage_cuda_launch(const void* rewards, int in_dtype, const int64_t* offsets, int64_t M, int64_t G,
                                int64_t group_size, int mode, double eps, void* adv, void* mean, void* stdv,
                                bool* zero_std, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  switch (in_dtype) {
    case kFloat64:
      err = dispatch<double, double>(static_cast<const double*>(rewards), offsets, M, G, group_size, mode, eps,
                                     static_cast<double*>(adv), static_cast<double*>(mean), static_cast<double*>(stdv),
                                     zero_std, s);
      break;
    case kFloat32:
      err = dispatch<float, float>(static_cast<const float*>(rewards), offsets, M, G, group_size, mode, eps,
                                   static_cast<float*>(adv), static_cast<float*>(mean), static_cast<float*>(stdv),
                                   zero_std, s);
      break;
    case kFloat16:
      err = dispatch<__half, float>(static_cast<const __half*>(rewards), offsets, M, G, group_size, mode, eps,
                                    static_cast<float*>(adv), static_cast<float*>(mean), static_cast<float*>(stdv),
                                    zero_std, s);
      break;
    case kBFloat16:
      err = dispatch<__nv_bfloat16, float>(static_cast<const __nv_bfloat16*>(rewards), offsets, M, G, group_size, mode,
                                           eps, static_cast<float*>(adv), static_cast<float*>(mean),
                                           static_cast<float*>(stdv), zero_std, s);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(err);
}

}  // namespace zreward
