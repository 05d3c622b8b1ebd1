// The optional bias of llmserve's linear kernels, checked once.
#pragma once
#include <ATen/ATen.h>

namespace llmserve_kernels {

// bias's data, float32 [N], or nullptr without one; `keep` holds the contiguous tensor it points into
inline const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t N, at::Tensor& keep, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  keep = bias->contiguous();
  TORCH_CHECK(keep.numel() == N && keep.scalar_type() == at::kFloat, op, ": bias [N] float32");
  return keep.data_ptr<float>();
}

}  // namespace llmserve_kernels
