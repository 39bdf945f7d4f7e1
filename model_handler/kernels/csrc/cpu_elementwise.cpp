// A decoder layer's elementwise work on CPU, one pass over memory each: residual add + RMSNorm, SiLU-and-mul,
// in-place rotary. Why: torch runs each as several ops in half precision (RMSNorm alone: upcast, square,
// mean, rsqrt, two multiplies, downcast): together 10-12% of a 512-token prefill step of the 100M model on 2 cores.
//
// Same math and the same roundings as the torch ops they replace (fp32 inside, the storage type between the
// ops torch would round between), so the CPU backend's outputs stay those of the torch layers to within fp32
// summation order. Rows run in parallel on torch's threads, a few rows per task so small batches stay on one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu_math.h"

namespace sagemaker_llm_cpu {
namespace {

int64_t grain_for(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// out = T(T(v * inv_rms(v)) * w), v = T(x + residual): HF's LlamaRMSNorm (normalize in fp32, round, weight).
template <typename T>
void add_rms_norm_rows(const T* x, int64_t x_stride, const T* residual, int64_t res_stride, const T* weight, T* out,
                       T* residual_out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    std::vector<float> v(n), tmp(n), w(n);
    std::vector<T> scratch(n);
    to_float(weight, w.data(), n);
    for (int64_t r = begin; r < end; ++r) {
      to_float(x + r * x_stride, v.data(), n);
      if (residual != nullptr) {
        to_float(residual + r * res_stride, tmp.data(), n);
        for (int64_t i = 0; i < n; ++i) v[i] += tmp[i];
        from_float(v.data(), residual_out + r * n, n);  // the new residual, rounded as torch's add would
        to_float(residual_out + r * n, v.data(), n);
      }
      float lanes[16] = {0.f};
      int64_t i = 0;
      for (; i + 16 <= n; i += 16)
        for (int64_t j = 0; j < 16; ++j) lanes[j] += v[i + j] * v[i + j];
      float sum = 0.f;
      for (; i < n; ++i) sum += v[i] * v[i];
      for (int64_t j = 0; j < 16; ++j) sum += lanes[j];
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
      for (int64_t k = 0; k < n; ++k) tmp[k] = v[k] * inv;
      round_to<T>(tmp.data(), scratch.data(), n);
      for (int64_t k = 0; k < n; ++k) tmp[k] *= w[k];
      from_float(tmp.data(), out + r * n, n);
    }
  });
}

// out = T(T(silu(gate)) * up) for x = [gate | up]: torch's F.silu(gate) * up.
template <typename T>
void silu_and_mul_rows(const T* x, int64_t x_stride, T* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, grain_for(2 * d), [&](int64_t begin, int64_t end) {
    std::vector<float> g(d), u(d), e(d);
    std::vector<T> scratch(d);
    for (int64_t r = begin; r < end; ++r) {
      to_float(x + r * x_stride, g.data(), d);
      to_float(x + r * x_stride + d, u.data(), d);
      for (int64_t i = 0; i < d; ++i) e[i] = -std::fabs(g[i]);
      exp_nonpositive(e.data(), d);  // exp(-|g|): no overflow either side
      for (int64_t i = 0; i < d; ++i) {
        const float numerator = g[i] >= 0.f ? g[i] : g[i] * e[i];  // g * sigmoid(g), one division
        g[i] = numerator / (1.f + e[i]);
      }
      round_to<T>(g.data(), scratch.data(), d);
      for (int64_t i = 0; i < d; ++i) g[i] *= u[i];
      from_float(g.data(), out + r * d, d);
    }
  });
}

// x[i] = T(T(x[i] * cos[i]) + x[i +- half] * sin[i]) over the first rotary_dim dims of every head, in place: torch's
// addcmul(x * cos, roll(x, half), sin) with the sign of rotate_half folded into sin (RotaryEmbedding).
template <typename T>
void rotary_rows(T* x, int64_t token_stride, int64_t head_stride, const T* cache, int64_t cache_stride,
                 const int64_t* positions, int64_t tokens, int64_t heads, int64_t rot, std::atomic<bool>* bad,
                 int64_t max_position) {
  const int64_t half = rot / 2;
  at::parallel_for(0, tokens, grain_for(heads * rot), [&](int64_t begin, int64_t end) {
    std::vector<float> c(rot), s(rot), v(rot), out(rot);
    std::vector<T> scratch(rot);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = positions[t];
      if (p < 0 || p >= max_position) {
        bad->store(true);
        return;
      }
      to_float(cache + p * cache_stride, c.data(), rot);
      to_float(cache + p * cache_stride + rot, s.data(), rot);
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + t * token_stride + h * head_stride;
        to_float(row, v.data(), rot);
        for (int64_t i = 0; i < rot; ++i) out[i] = v[i] * c[i];
        round_to<T>(out.data(), scratch.data(), rot);
        for (int64_t i = 0; i < half; ++i) out[i] += v[i + half] * s[i];
        for (int64_t i = half; i < rot; ++i) out[i] += v[i - half] * s[i];
        from_float(out.data(), row, rot);
      }
    }
  });
}

template <typename F>
void dispatch(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", type);
  }
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "add_rms_norm: x must be [T, hidden] with unit-stride rows");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n && weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: weight must be [hidden] in x's dtype");
  const auto w = weight.contiguous();
  auto out = at::empty({rows, n}, x.options());
  at::Tensor residual_out = x;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 &&
                    residual->scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must match x");
    residual_out = at::empty({rows, n}, x.options());
  }
  dispatch(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const bool add = residual.has_value();
    add_rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), add ? residual->data_ptr<T>() : nullptr,
                         add ? residual->stride(0) : 0, w.data_ptr<T>(), out.data_ptr<T>(),
                         add ? residual_out.data_ptr<T>() : nullptr, rows, n, static_cast<float>(eps));
  });
  return {out, residual_out};
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0,
              "silu_and_mul: x must be [T, 2d] with unit-stride rows");
  const int64_t rows = x.size(0), d = x.size(1) / 2;
  auto out = at::empty({rows, d}, x.options());
  dispatch(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_rows<T>(x.data_ptr<T>(), x.stride(0), out.data_ptr<T>(), rows, d);
  });
  return out;
}

at::Tensor rotary_(at::Tensor x, const at::Tensor& cos_sin_cache, const at::Tensor& positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary_: x must be [T, heads, head_dim] with unit-stride heads");
  TORCH_CHECK(cos_sin_cache.dim() == 3 && cos_sin_cache.size(1) == 2 && cos_sin_cache.is_contiguous() &&
                  cos_sin_cache.scalar_type() == x.scalar_type(),
              "rotary_: cos_sin_cache must be a contiguous [max_position, 2, rotary_dim] in x's dtype");
  const int64_t rot = cos_sin_cache.size(2);
  TORCH_CHECK(rot % 2 == 0 && rot <= x.size(2), "rotary_: rotary_dim must be even and <= head_dim");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == x.size(0) && positions.scalar_type() == at::kLong,
              "rotary_: positions must be [T] int64");
  const auto pos = positions.contiguous();
  std::atomic<bool> bad{false};
  dispatch(x.scalar_type(), "rotary_", [&](auto tag) {
    using T = decltype(tag);
    rotary_rows<T>(x.data_ptr<T>(), x.stride(0), x.stride(1), cos_sin_cache.data_ptr<T>(), 2 * rot,
                   pos.data_ptr<int64_t>(), x.size(0), x.size(1), rot, &bad, cos_sin_cache.size(0));
  });
  TORCH_CHECK(!bad.load(), "rotary_: a position outside the cos/sin cache");
  return x;
}

}  // namespace
}  // namespace sagemaker_llm_cpu

TORCH_LIBRARY_FRAGMENT(sagemaker_llm_cpu, m) {
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos_sin_cache, Tensor positions) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(sagemaker_llm_cpu, CPU, m) {
  m.impl("add_rms_norm", &sagemaker_llm_cpu::add_rms_norm);
  m.impl("silu_and_mul", &sagemaker_llm_cpu::silu_and_mul);
  m.impl("rotary_", &sagemaker_llm_cpu::rotary_);
}
