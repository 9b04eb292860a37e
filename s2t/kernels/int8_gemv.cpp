// Weight-only int8 linear for few rows (decode steps), fp32 activations, AVX2 + FMA.
//
// y[m, n] = scale[n] * sum_k x[m, k] * q[n, k]      x: [M, K] fp32, q: [N, K] int8, scale: [N] fp32
//
// Why: torch's _weight_int8pack_mm reads weights at 3-6 GB/s per core on AVX2 machines (measured on the
// embedded models' shapes, issue #14) while a core streams ~12 GB/s. A decode step reads every weight once,
// so the kernel must convert int8 to fp32 and FMA faster than memory delivers it: 32 weights per load,
// four output rows at a time so that four independent FMA chains hide the FMA latency, every activation row
// against each loaded weight vector (the weights are read once per call whatever M is).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

// R output rows [n0, n0 + R) for M activation rows.
template <int M, int R>
inline void block(const float* x, const int8_t* q, const float* scale, float* y, int64_t K, int64_t N, int64_t n0) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t K32 = K & ~int64_t(31);
  for (int64_t k = 0; k < K32; k += 32) {
    for (int r = 0; r < R; ++r) {
      // the rows are short (896 bytes for the 0.5B's hidden size): R interleaved streams that restart every
      // few cache lines defeat the hardware prefetcher, so fetch the next block's rows ourselves
      _mm_prefetch(reinterpret_cast<const char*>(q + (n0 + R + r) * K + k), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q + (n0 + 2 * R + r) * K + k), _MM_HINT_T0);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (n0 + r) * K + k));
      const __m128i lo = _mm256_castsi256_si128(b), hi = _mm256_extracti128_si256(b, 1);
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + k;
        __m256 a = acc[r][m];
        a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a);
        a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a);
        a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a);
        a = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a);
        acc[r][m] = a;
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const int8_t* qr = q + (n0 + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t k = K32; k < K; ++k) s += x[m * K + k] * float(qr[k]);  // K not a multiple of 32
      y[m * N + n0 + r] = s * scale[n0 + r];
    }
  }
}

template <int M>
void rows(const float* x, const int8_t* q, const float* scale, float* y, int64_t K, int64_t N) {
  // R * M accumulators stay in the 16 ymm registers with the 4 weight vectors: R = 4 up to M = 2, then fewer.
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  const int64_t blocks = N / R;
  // a grain of ~64 output rows: enough work per task to amortise the scheduling, enough tasks to balance
  at::parallel_for(0, blocks, std::max<int64_t>(1, 64 / R), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block<M, R>(x, q, scale, y, K, N, b * R);
  });
  for (int64_t n = blocks * R; n < N; ++n) block<M, 1>(x, q, scale, y, K, N, n);  // N not a multiple of R
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && scale.dim() == 1, "int8_linear: x [M, K], q [N, K], scale [N]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int8_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(q.scalar_type() == torch::kInt8, "int8_linear: q must be int8, got ", q.scalar_type());
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32, "int8_linear: scale must be float32");
  TORCH_CHECK(x.size(1) == q.size(1) && scale.size(0) == q.size(0), "int8_linear: shapes ", x.sizes(), " ",
              q.sizes(), " ", scale.sizes(), " do not match");
  x = x.contiguous();
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // tiles of up to 8 activation rows: above that the weights are re-read once per tile (the weight-format
  // plan serves larger calls with packed fp32 anyway)
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t mt = std::min<int64_t>(8, M - m0);
    const float* xt = xp + m0 * K;
    float* yt = yp + m0 * N;
    switch (mt) {
      case 1: rows<1>(xt, qp, sp, yt, K, N); break;
      case 2: rows<2>(xt, qp, sp, yt, K, N); break;
      case 3: rows<3>(xt, qp, sp, yt, K, N); break;
      case 4: rows<4>(xt, qp, sp, yt, K, N); break;
      case 5: rows<5>(xt, qp, sp, yt, K, N); break;
      case 6: rows<6>(xt, qp, sp, yt, K, N); break;
      case 7: rows<7>(xt, qp, sp, yt, K, N); break;
      default: rows<8>(xt, qp, sp, yt, K, N); break;
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "y = (x @ q.T) * scale; x fp32 [M, K], q int8 [N, K], scale fp32 [N]");
}
