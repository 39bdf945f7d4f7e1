// Argument checks shared by the paged attention ops (the layouts are kernels/reference.py's): a bad call raises
// a RuntimeError in Python instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

namespace sagemaker_llm_cpu {

inline void check_paged_attention_args(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                       const at::Tensor& v_cache) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query rows must be [H, D] contiguous");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == query.sizes(), "out must be contiguous and shaped like query");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && query.scalar_type() == v_cache.scalar_type() &&
                  query.scalar_type() == out.scalar_type(),
              "query, caches and out must share a dtype");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0 && query.size(2) == k_cache.size(3), "heads do not match");
}

}  // namespace sagemaker_llm_cpu
