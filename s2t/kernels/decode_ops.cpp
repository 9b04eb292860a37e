// The small operations between a batch-1 decode step's matrix products, each one call instead of several
// torch operations (Engine._decode_one, issue #14).
//
// Why: with the matrix products in the project's own kernels, what remains of a one-token step is dozens of
// tiny torch operations per layer (RMSNorm as six, the rotary embedding as eight, the cache writes, the
// attention's reshapes), each costing a few microseconds of dispatch for a few hundred floats of work; py-spy
// put that share at 16-23 % of a one-thread step (README, issue #14). These do the same arithmetic in one
// pass over float32 data:
//
//   add_rms_norm(hidden, delta, weight, eps)  hidden += delta (in place, when delta is given), then
//                                            weight * hidden / sqrt(mean(hidden^2) + eps): Qwen2/Llama's RMSNorm
//   rope_attend(qkv, cos, sin, keys, values, t, scale, heads)
//                                            one token's attention: rotate its q and k heads (rotate-half rotary
//                                            embedding), write its k and v at cache position t, attend its q heads
//                                            over positions 0..t of their key/value head (grouped-query)
//   silu_mul(gate_up)                         silu(gate) * up of [gate | up]
//
// Float32 only; the results match torch's to rounding (the order of the sums differs), which the tests bound.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

void check_f32_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// sum_d a[d] * b[d], eight lanes at a time (a plain loop would not vectorise: float sums may not be reordered)
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.0f;
  for (float l : lanes) sum += l;
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// y += w * x
inline void axpy(float w, const float* x, float* y, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < n; ++d) y[d] += w * x[d];
}

}  // namespace

// hidden [1, H] (or [H]); delta like hidden or undefined (None); weight [H]. Returns the normed [1, H].
torch::Tensor add_rms_norm(torch::Tensor hidden, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps) {
  check_f32_contiguous(hidden, "hidden");
  check_f32_contiguous(weight, "weight");
  const int64_t H = weight.numel();
  TORCH_CHECK(hidden.numel() == H, "add_rms_norm: hidden has ", hidden.numel(), " values, weight ", H);
  float* h = hidden.data_ptr<float>();
  if (delta.has_value() && delta->defined()) {
    check_f32_contiguous(*delta, "delta");
    TORCH_CHECK(delta->numel() == H, "add_rms_norm: delta has ", delta->numel(), " values, weight ", H);
    const float* d = delta->data_ptr<float>();
    for (int64_t i = 0; i < H; ++i) h[i] += d[i];
  }
  double sum = 0.0;
  for (int64_t i = 0; i < H; ++i) sum += static_cast<double>(h[i]) * h[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(sum / H) + static_cast<float>(eps));
  auto out = torch::empty_like(hidden);
  float* o = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (h[i] * inv);
  return out;
}

// qkv [1, (heads + 2 kv_heads) * D] laid out [q heads | k heads | v heads]; cos, sin [D]; keys, values
// [kv_heads, capacity, D] with capacity > t. Returns the attention output [1, heads * D] (heads side by side,
// as o_proj reads it).
torch::Tensor rope_attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                          torch::Tensor values, int64_t t, double scale, int64_t heads) {
  for (auto* p : {&qkv, &cos, &sin, &keys, &values}) check_f32_contiguous(*p, "rope_attend's tensors");
  TORCH_CHECK(keys.dim() == 3 && values.sizes() == keys.sizes(), "rope_attend: keys/values [kv_heads, capacity, D]");
  const int64_t kv_heads = keys.size(0), cap = keys.size(1), D = keys.size(2);
  TORCH_CHECK(D % 2 == 0 && cos.numel() == D && sin.numel() == D, "rope_attend: cos/sin need ", D, " values");
  TORCH_CHECK(heads % kv_heads == 0, "rope_attend: ", heads, " query heads over ", kv_heads, " key/value heads");
  TORCH_CHECK(qkv.numel() == (heads + 2 * kv_heads) * D, "rope_attend: qkv has ", qkv.numel(), " values, expected ",
              (heads + 2 * kv_heads) * D);
  TORCH_CHECK(0 <= t && t < cap, "rope_attend: position ", t, " outside the cache's capacity ", cap);
  const float* in = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* kc = keys.data_ptr<float>();
  float* vc = values.data_ptr<float>();
  const int64_t half = D / 2;
  // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
  auto rotate = [&](const float* x, float* y) {
    for (int64_t d = 0; d < half; ++d) {
      y[d] = x[d] * c[d] + (-x[d + half]) * s[d];
      y[d + half] = x[d + half] * c[d + half] + x[d] * s[d + half];
    }
  };
  std::vector<float> q(heads * D);
  for (int64_t h = 0; h < heads; ++h) rotate(in + h * D, q.data() + h * D);
  for (int64_t g = 0; g < kv_heads; ++g) {
    rotate(in + (heads + g) * D, kc + (g * cap + t) * D);
    const float* v = in + (heads + kv_heads + g) * D;
    std::copy(v, v + D, vc + (g * cap + t) * D);
  }
  auto out = torch::empty({1, heads * D}, qkv.options());
  float* o = out.data_ptr<float>();
  const int64_t group = heads / kv_heads, n = t + 1;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(n);
    for (int64_t h = h0; h < h1; ++h) {
      const float* qh = q.data() + h * D;
      const float* kh = kc + (h / group) * cap * D;
      const float* vh = vc + (h / group) * cap * D;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = dot(qh, kh + j * D, D) * sc;
        mx = std::max(mx, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
      const float inv = 1.0f / sum;
      float* oh = o + h * D;
      std::fill(oh, oh + D, 0.0f);
      for (int64_t j = 0; j < n; ++j) axpy(p[j] * inv, vh + j * D, oh, D);
    }
  });
  return out;
}

// gate_up [1, 2 I] = [gate | up] -> [1, I]
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_f32_contiguous(gate_up, "gate_up");
  TORCH_CHECK(gate_up.numel() % 2 == 0, "silu_mul: gate_up needs an even number of values");
  const int64_t I = gate_up.numel() / 2;
  auto out = torch::empty({1, I}, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  const float* u = g + I;
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "hidden += delta (if given); RMSNorm(hidden) * weight");
  m.def("rope_attend", &rope_attend, "rotary q/k, write k/v at t, grouped-query attention over 0..t");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
}
