// CPU kernel for fastdiff::group_norm_silu (see fastdiff.h for the contract).
#include "fastdiff.h"

namespace fastdiff {

at::Tensor group_norm_silu_cpu(const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps,
                               const std::optional<at::Tensor>& pre_bias,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift, bool apply_silu) {
  TORCH_CHECK(false, "fastdiff.group_norm_silu: CPU kernel not implemented yet");
}

}  // namespace fastdiff
