// Group-wise advantage: operator schema (TORCH_LIBRARY) and the CPU implementation.
//
// Per group, in double: the group's first value K is subtracted before summing (so 1e6 + small
// noise keeps its noise), a second pass over the (cache-resident) group gives the variance, a
// third writes the advantages.  Groups are split across threads with at::parallel_for; every
// group is reduced by one thread in a fixed order, so results are deterministic.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "group_advantage_common.h"

namespace zreward {
namespace {

template <typename T, typename O>
void run_cpu(const T* r, const int64_t* offsets, int64_t G, int64_t gsize, int64_t M, int mode, double eps, O* adv,
             O* mean_out, O* std_out, bool* zs_out) {
  const int64_t avg = G > 0 ? std::max<int64_t>(M / G, 1) : 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / avg);
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t start = offsets ? offsets[g] : g * gsize;
      const int64_t end = offsets ? offsets[g + 1] : start + gsize;
      const int64_t n = end - start;
      if (n <= 0) {
        mean_out[g] = O(0);
        std_out[g] = O(0);
        zs_out[g] = true;
        continue;
      }
      const double K = static_cast<double>(r[start]);
      double s1 = 0.0;
      double mn = std::numeric_limits<double>::infinity();
      double mx = -mn;
      for (int64_t i = start; i < end; ++i) {
        const double x = static_cast<double>(r[i]);
        s1 += x - K;
        mn = std::min(mn, x);
        mx = std::max(mx, x);
      }
      const double shift = s1 / static_cast<double>(n);
      double s2 = 0.0;
      for (int64_t i = start; i < end; ++i) {
        const double dv = (static_cast<double>(r[i]) - K) - shift;
        s2 += dv * dv;
      }
      const double sd = n > 1 ? std::sqrt(s2 / static_cast<double>(n - 1)) : 0.0;
      const double scale = advantage_scale(n, sd, mode, eps);
      for (int64_t i = start; i < end; ++i) {
        adv[i] = static_cast<O>(((static_cast<double>(r[i]) - K) - shift) * scale);
      }
      mean_out[g] = static_cast<O>(K + shift);
      std_out[g] = static_cast<O>(sd);
      zs_out[g] = (mn == mx);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_advantage_cpu(
    const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size, int64_t mode,
    double eps) {
  TORCH_CHECK(rewards.device().is_cpu(), "group_advantage_cpu got a tensor on ", rewards.device());
  Prepared p = prepare(rewards, offsets, group_size, mode);
  const int64_t* off = p.offsets.has_value() ? p.offsets->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.rewards.scalar_type(), "group_advantage_cpu", [&] {
    if (p.rewards.scalar_type() == at::kDouble) {
      run_cpu<scalar_t, double>(p.rewards.data_ptr<scalar_t>(), off, p.G, group_size, p.M, static_cast<int>(mode), eps,
                                p.adv.data_ptr<double>(), p.mean.data_ptr<double>(), p.stdv.data_ptr<double>(),
                                p.zero_std.data_ptr<bool>());
    } else {
      run_cpu<scalar_t, float>(p.rewards.data_ptr<scalar_t>(), off, p.G, group_size, p.M, static_cast<int>(mode), eps,
                               p.adv.data_ptr<float>(), p.mean.data_ptr<float>(), p.stdv.data_ptr<float>(),
                               p.zero_std.data_ptr<bool>());
    }
  });
  return {p.adv, p.mean, p.stdv, p.zero_std};
}

}  // namespace

TORCH_LIBRARY(zreward, m) {
  m.def(
      "group_advantage(Tensor rewards, Tensor? offsets, int group_size, int mode, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zreward, CPU, m) { m.impl("group_advantage", &group_advantage_cpu); }

}  // namespace zreward

// A Python module with no functions: importing it loads the library and registers the op.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
