// CPU kernel for fastdiff::attention (see fastdiff.h for the contract).
#include "fastdiff.h"

namespace fastdiff {

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& attn_bias, std::optional<double> scale) {
  TORCH_CHECK(false, "fastdiff.attention: CPU kernel not implemented yet");
}

}  // namespace fastdiff
