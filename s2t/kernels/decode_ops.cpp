// The small operations between the matrix products of a one-sequence decode step, each one call instead of
// several torch operations (Engine._decode_compiled, issue #14).
//
// Why: with the matrix products in the project's own kernels, what remains of a one-token step is dozens of
// tiny torch operations per layer (RMSNorm as six, the rotary embedding as eight, the cache writes, the
// attention's reshapes), each costing a few microseconds of dispatch for a few hundred floats of work; py-spy
// put that share at 16-23 % of a one-thread step (README, issue #14). These do the same arithmetic in one
// pass over float32 data, for one new token or for a short run of M new tokens of one sequence (a selector's
// Select block, a worker's re-fed tokens), or for the rows of several sequences decoded together:
//
//   add_rms_norm(hidden, delta, weight, eps)  hidden += delta (in place, when delta is given), then, row by
//                                            row, weight * hidden / sqrt(mean(hidden^2) + eps): Qwen2/Llama's
//                                            RMSNorm
//   rope_attend(qkv, cos, sin, keys, values, t, scale, heads)
//                                            M tokens' causal attention: rotate their q and k heads (rotate-half
//                                            rotary embedding), write their k and v at cache positions t..t+M-1,
//                                            attend row r's q heads over positions 0..t+r of their key/value
//                                            head (grouped-query)
//   rope_attend_batch(qkv, cos, sin, keys[], values[], starts[], counts[], scale, heads)
//                                            the same for several sequences' rows, each over its own cache
//   silu_mul(gate_up)                         silu(gate) * up of [gate | up], row by row
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

// exp of eight floats: Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial, the power of
// two built in the exponent bits), within ~2 ulp of std::exp on [-88.37, 88.37], clamped outside it. Why:
// silu * up calls exp once per intermediate feature and row, and the scalar std::exp made silu_mul 2.4-4x
// slower than torch's vectorised silu (57 against 24 us at one row of the 1.5B, 3.2 against 0.8 ms at 64).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

}  // namespace

// hidden [M, H] (or [H]); delta like hidden or undefined (None); weight [H]. Returns the normed rows, shaped
// like hidden.
torch::Tensor add_rms_norm(torch::Tensor hidden, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps) {
  check_f32_contiguous(hidden, "hidden");
  check_f32_contiguous(weight, "weight");
  const int64_t H = weight.numel();
  TORCH_CHECK(H > 0 && hidden.numel() % H == 0 && hidden.size(-1) == H, "add_rms_norm: hidden has rows of ",
              hidden.size(-1), " values, weight ", H);
  const int64_t M = hidden.numel() / H;
  float* h = hidden.data_ptr<float>();
  if (delta.has_value() && delta->defined()) {
    check_f32_contiguous(*delta, "delta");
    TORCH_CHECK(delta->numel() == hidden.numel(), "add_rms_norm: delta has ", delta->numel(), " values, hidden ",
                hidden.numel());
    const float* d = delta->data_ptr<float>();
    for (int64_t i = 0; i < M * H; ++i) h[i] += d[i];
  }
  auto out = torch::empty_like(hidden);
  float* o = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* hr = h + r * H;
    float* orow = o + r * H;
    const float sum = dot(hr, hr, H);
    const float inv = 1.0f / std::sqrt(sum / H + static_cast<float>(eps));
    for (int64_t i = 0; i < H; ++i) orow[i] = w[i] * (hr[i] * inv);
  }
  return out;
}

// One query head's attention over keys/values 0..n-1 of its key/value head (kh, vh: [capacity, D]) into oh [D];
// p: scratch for n scores.
inline void attend_head(const float* qh, const float* kh, const float* vh, int64_t n, int64_t D, float sc, float* p,
                        float* oh) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    p[j] = dot(qh, kh + j * D, D) * sc;
    mx = std::max(mx, p[j]);
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
  const float inv = 1.0f / sum;
  std::fill(oh, oh + D, 0.0f);
  for (int64_t j = 0; j < n; ++j) axpy(p[j] * inv, vh + j * D, oh, D);
}

// Where one query row's keys/values go and what it attends over: its cache's keys/values [kv_heads, cap, D] and
// its position there (it attends over positions 0..pos).
struct RowCache {
  float* keys;
  float* values;
  int64_t cap;
  int64_t pos;
};

// What rope_attend and rope_attend_batch share once their arguments are checked: rotate every row's q and k
// heads with its own angles, write its k and v at its position, then attend each (row, query head).
torch::Tensor rotate_write_attend(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                  const std::vector<RowCache>& rows, int64_t heads, int64_t kv_heads, int64_t D,
                                  double scale) {
  const int64_t M = static_cast<int64_t>(rows.size()), width = (heads + 2 * kv_heads) * D, half = D / 2;
  const float* in = qkv.data_ptr<float>();
  // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], with row r's angles
  auto rotate = [&](int64_t r, const float* x, float* y) {
    const float* c = cos.data_ptr<float>() + r * D;
    const float* s = sin.data_ptr<float>() + r * D;
    for (int64_t d = 0; d < half; ++d) {
      y[d] = x[d] * c[d] + (-x[d + half]) * s[d];
      y[d + half] = x[d + half] * c[d + half] + x[d] * s[d + half];
    }
  };
  // every row's keys/values are in its cache before any row attends: a row reads the rows of its own sequence
  // before it in this call
  std::vector<float> q(M * heads * D);
  int64_t longest = 0;
  for (int64_t r = 0; r < M; ++r) {
    const float* row = in + r * width;
    const RowCache& c = rows[r];
    for (int64_t h = 0; h < heads; ++h) rotate(r, row + h * D, q.data() + (r * heads + h) * D);
    for (int64_t g = 0; g < kv_heads; ++g) {
      rotate(r, row + (heads + g) * D, c.keys + (g * c.cap + c.pos) * D);
      const float* v = row + (heads + kv_heads + g) * D;
      std::copy(v, v + D, c.values + (g * c.cap + c.pos) * D);
    }
    longest = std::max(longest, c.pos + 1);
  }
  auto out = torch::empty({M, heads * D}, qkv.options());
  float* o = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, M * heads, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(longest);
    for (int64_t i = i0; i < i1; ++i) {
      const RowCache& c = rows[i / heads];
      const int64_t kv = (i % heads) / group;
      attend_head(q.data() + i * D, c.keys + kv * c.cap * D, c.values + kv * c.cap * D, c.pos + 1, D, sc, p.data(),
                  o + i * D);
    }
  });
  return out;
}

// qkv [M, (heads + 2 kv_heads) * D], each row laid out [q heads | k heads | v heads]; cos, sin [M, D] (or [D]
// for M = 1), row r's at position t + r; keys, values [kv_heads, capacity, D] with capacity >= t + M. Returns
// the attention output [M, heads * D] (heads side by side, as o_proj reads it).
torch::Tensor rope_attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                          torch::Tensor values, int64_t t, double scale, int64_t heads) {
  for (auto* p : {&qkv, &cos, &sin, &keys, &values}) check_f32_contiguous(*p, "rope_attend's tensors");
  TORCH_CHECK(keys.dim() == 3 && values.sizes() == keys.sizes(), "rope_attend: keys/values [kv_heads, capacity, D]");
  const int64_t kv_heads = keys.size(0), cap = keys.size(1), D = keys.size(2);
  TORCH_CHECK(heads % kv_heads == 0, "rope_attend: ", heads, " query heads over ", kv_heads, " key/value heads");
  const int64_t width = (heads + 2 * kv_heads) * D;
  TORCH_CHECK(qkv.size(-1) == width && qkv.numel() % width == 0, "rope_attend: qkv has rows of ", qkv.size(-1),
              " values, expected ", width);
  const int64_t M = qkv.numel() / width;
  TORCH_CHECK(M >= 1, "rope_attend: qkv has no rows");
  TORCH_CHECK(D % 2 == 0 && cos.numel() == M * D && sin.numel() == M * D, "rope_attend: cos/sin need ", M * D,
              " values (", M, " rows of ", D, ")");
  TORCH_CHECK(0 <= t && t + M <= cap, "rope_attend: position ", t + M - 1, " outside the cache's capacity ", cap);
  std::vector<RowCache> rows(M);
  for (int64_t r = 0; r < M; ++r) rows[r] = {keys.data_ptr<float>(), values.data_ptr<float>(), cap, t + r};
  return rotate_write_attend(qkv, cos, sin, rows, heads, kv_heads, D, scale);
}

// rope_attend for several sequences in one call (one thread team for all of them): rows
// [offsets[b], offsets[b] + counts[b]) of qkv, cos and sin are sequence b's, at positions starts[b].. of its cache
// keys[b], values[b]. Each sequence's rows get exactly what rope_attend of those rows alone gives (the same
// operations in the same order), so a row's result does not depend on the other sequences.
torch::Tensor rope_attend_batch(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                                std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                                std::vector<int64_t> starts, std::vector<int64_t> counts, double scale,
                                int64_t heads) {
  for (auto* p : {&qkv, &cos, &sin}) check_f32_contiguous(*p, "rope_attend_batch's tensors");
  const int64_t B = static_cast<int64_t>(keys.size());
  TORCH_CHECK(B >= 1 && values.size() == keys.size() && starts.size() == keys.size() && counts.size() == keys.size(),
              "rope_attend_batch: keys, values, starts and counts need one entry per sequence");
  TORCH_CHECK(keys[0].dim() == 3, "rope_attend_batch: keys/values [kv_heads, capacity, D]");
  const int64_t kv_heads = keys[0].size(0), D = keys[0].size(2);
  TORCH_CHECK(heads % kv_heads == 0, "rope_attend_batch: ", heads, " query heads over ", kv_heads,
              " key/value heads");
  const int64_t width = (heads + 2 * kv_heads) * D;
  TORCH_CHECK(qkv.size(-1) == width && qkv.numel() % width == 0, "rope_attend_batch: qkv has rows of ",
              qkv.size(-1), " values, expected ", width);
  const int64_t M = qkv.numel() / width;
  TORCH_CHECK(D % 2 == 0 && cos.numel() == M * D && sin.numel() == M * D, "rope_attend_batch: cos/sin need ",
              M * D, " values (", M, " rows of ", D, ")");
  std::vector<RowCache> rows;
  rows.reserve(M);
  for (int64_t b = 0; b < B; ++b) {
    for (auto* p : {&keys[b], &values[b]}) check_f32_contiguous(*p, "rope_attend_batch's caches");
    TORCH_CHECK(keys[b].dim() == 3 && values[b].sizes() == keys[b].sizes() && keys[b].size(0) == kv_heads &&
                keys[b].size(2) == D, "rope_attend_batch: sequence ", b, "'s keys/values are not [", kv_heads,
                ", capacity, ", D, "]");
    TORCH_CHECK(counts[b] >= 1 && 0 <= starts[b] && starts[b] + counts[b] <= keys[b].size(1),
                "rope_attend_batch: sequence ", b, "'s rows ", starts[b], "..", starts[b] + counts[b] - 1,
                " outside its cache's capacity ", keys[b].size(1));
    for (int64_t i = 0; i < counts[b]; ++i) {
      TORCH_CHECK(static_cast<int64_t>(rows.size()) < M, "rope_attend_batch: counts add up to more than qkv's ", M,
                  " rows");
      rows.push_back({keys[b].data_ptr<float>(), values[b].data_ptr<float>(), keys[b].size(1), starts[b] + i});
    }
  }
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == M, "rope_attend_batch: counts add up to ", rows.size(),
              ", qkv has ", M, " rows");
  return rotate_write_attend(qkv, cos, sin, rows, heads, kv_heads, D, scale);
}

// gate_up [M, 2 I], each row [gate | up] -> [M, I]
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_f32_contiguous(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1);
  TORCH_CHECK(width % 2 == 0, "silu_mul: gate_up needs an even number of values per row");
  const int64_t I = width / 2, M = gate_up.numel() / width;
  auto out = torch::empty({M, I}, gate_up.options());
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* g = gate_up.data_ptr<float>() + r * width;
    const float* u = g + I;
    float* orow = o + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
      _mm256_storeu_ps(orow + i, _mm256_mul_ps(_mm256_div_ps(gv, sig), _mm256_loadu_ps(u + i)));
    }
    for (; i < I; ++i) orow[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "hidden += delta (if given); RMSNorm(hidden) * weight");
  m.def("rope_attend", &rope_attend, "rotary q/k, write k/v at t.., causal grouped-query attention over 0..t+r");
  m.def("rope_attend_batch", &rope_attend_batch,
        "rope_attend for several sequences' rows, each over its own cache, in one call");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up]");
}
