// Argument checks and output allocation shared by the CPU and CUDA bindings (torch headers here).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "group_advantage.h"

namespace zreward {

struct Prepared {
  at::Tensor rewards;                 // 1-D, contiguous
  std::optional<at::Tensor> offsets;  // int64, contiguous, [G + 1]
  int64_t M;
  int64_t G;
  at::Tensor adv, mean, stdv, zero_std;
};

inline Prepared prepare(const at::Tensor& rewards, const std::optional<at::Tensor>& offsets, int64_t group_size,
                        int64_t mode) {
  TORCH_CHECK(rewards.dim() == 1, "rewards must be 1-D, got ", rewards.dim(), " dimensions");
  TORCH_CHECK(at::isFloatingType(rewards.scalar_type()), "rewards must be a floating-point tensor, got ",
              rewards.scalar_type());
  TORCH_CHECK(mode >= kStd && mode <= kRloo, "mode must be 0 (std), 1 (mean) or 2 (rloo), got ", mode);
  Prepared p;
  p.rewards = rewards.contiguous();
  p.M = rewards.numel();
  if (offsets.has_value()) {
    const auto& o = *offsets;
    TORCH_CHECK(o.dim() == 1 && o.numel() >= 1, "group_offsets must be 1-D with G + 1 >= 1 entries");
    TORCH_CHECK(o.scalar_type() == at::kLong, "group_offsets must be int64, got ", o.scalar_type());
    TORCH_CHECK(o.device() == rewards.device(), "group_offsets must be on the rewards' device");
    p.offsets = o.contiguous();
    p.G = o.numel() - 1;
  } else {
    TORCH_CHECK(group_size > 0, "group_size must be positive, got ", group_size);
    TORCH_CHECK(p.M % group_size == 0, "the number of rewards (", p.M, ") is not a multiple of group_size (",
                group_size, ")");
    p.G = p.M / group_size;
  }
  const auto out_t = rewards.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = rewards.options().dtype(out_t);
  p.adv = at::empty({p.M}, opts);
  p.mean = at::empty({p.G}, opts);
  p.stdv = at::empty({p.G}, opts);
  p.zero_std = at::empty({p.G}, rewards.options().dtype(at::kBool));
  return p;
}

}  // namespace zreward
