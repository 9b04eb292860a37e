// 4-bit weights x int8 activations for few to a few dozen rows, AVX-512 VNNI: the `int4_vnni` weight format.
//
// y[m, n] = sum_g d[n, g] * sx[m, b(g)] * sum_{k in group g} xq[m, k] * q[n, k]
//
// Weights: symmetric 4-bit values q in [-8, 7], one float16 scale d per group of 32 inputs (llama.cpp's Q4_0
// layout of information: 4.5 bits per weight), rows zero-padded to a multiple of 128 inputs. Stored as
// nibbles u = q + 8: byte j of each 64-input chunk holds input j in its low nibble and input j + 32 in its
// high one, so one AND and one shift give the chunk's 64 values in input order. Activations: quantised to
// int8 per row and block of 128 inputs, exactly as int8_vnni does (act_quant.h).
//
// Why: a decode step at batch 1 reads every weight once and is bounded by memory bandwidth; int8 reads
// 1 byte per weight (1.55 GB per token for the 1.5B), this format 0.5625, about what llama.cpp's Q4_K files
// hold. vpdpbusd takes the unsigned nibbles as its uint8 operand; each int32 lane starts at -8 times its
// share of the activations (the offset's correction), so after the dot product the lane holds the true
// signed sum over its 4 inputs, and lanes 0-7 / 8-15 of a chunk are its first / second group of 32 inputs.
//
// Every output depends only on its own activation row, in a fixed order (batch-invariant).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "act_quant.h"

namespace {

constexpr int64_t kGroup = 32;  // inputs per weight scale
constexpr int kRows = 4;        // output rows per tile

// R output rows [n0, n0 + R) against MT activation rows [m0, m0 + MT).
template <int R, int MT>
inline void tile(const int8_t* xq, const float* sx, const int32_t* xoff, const uint8_t* w, const at::Half* d,
                 float* y, int64_t Kp, int64_t N, int64_t n0, int64_t m0, bool prefetch) {
  const int64_t nb = Kp / kBlock, nc = Kp / 64, ng = Kp / kGroup, row_bytes = Kp / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // lanes 0-7 take the chunk's first group scale, 8-15 its second
  const __m512i first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 facc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) facc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 sxv[MT];
    for (int m = 0; m < MT; ++m) sxv[m] = _mm512_set1_ps(sx[(m0 + m) * nb + b]);
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + (n0 + r) * row_bytes + b * (kBlock / 2);
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(row + R * row_bytes), _MM_HINT_T0);
      // the block's 4 group scales, float16 -> float32
      const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d + (n0 + r) * ng + b * 4)));
      const __m512 d512 = _mm512_castps128_ps512(d4);
      const __m512 dv[2] = {_mm512_permutexvar_ps(first, d512), _mm512_permutexvar_ps(second, d512)};
      for (int c = 0; c < 2; ++c) {  // the block's two 64-input chunks
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 32));
        const __m256i lo = _mm256_and_si256(packed, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        const int64_t chunk = b * 2 + c;
        for (int m = 0; m < MT; ++m) {
          const __m512i start = _mm512_loadu_si512(xoff + ((m0 + m) * nc + chunk) * kLanes);
          const __m512i xv = _mm512_loadu_si512(xq + (m0 + m) * Kp + chunk * 64);
          const __m512i dot = _mm512_dpbusd_epi32(start, u, xv);
          facc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv[c], sxv[m]), facc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(facc[r][m]), 1));
      y[(m0 + m) * N + n0 + r] = reduce16(_mm512_castps512_ps256(facc[r][m]), hi);
    }
}

template <int R>
inline void rows_for(const int8_t* xq, const float* sx, const int32_t* xoff, const uint8_t* w, const at::Half* d,
                     float* y, int64_t M, int64_t Kp, int64_t N, int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2) tile<R, 2>(xq, sx, xoff, w, d, y, Kp, N, n0, m0, m0 == 0);
  for (; m0 < M; ++m0) tile<R, 1>(xq, sx, xoff, w, d, y, Kp, N, n0, m0, m0 == 0);
}

}  // namespace

torch::Tensor int4_vnni_linear(torch::Tensor x, torch::Tensor w, torch::Tensor d, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && d.dim() == 2, "int4_vnni_linear: x [M, K], w [N, Kp / 2], d [N, Kp / 32]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int4_vnni_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == torch::kUInt8, "int4_vnni_linear: w must be uint8, got ", w.scalar_type());
  TORCH_CHECK(d.scalar_type() == torch::kFloat16, "int4_vnni_linear: d must be float16, got ", d.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1) * 2;
  TORCH_CHECK(K == in_features && Kp % kBlock == 0 && Kp >= K && Kp < K + kBlock && d.size(0) == N &&
                  d.size(1) == Kp / kGroup,
              "int4_vnni_linear: shapes ", x.sizes(), " ", w.sizes(), " ", d.sizes(), " do not match ", in_features,
              " inputs");
  x = x.contiguous();
  w = w.contiguous();
  d = d.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M * (Kp / kBlock));
  std::vector<int32_t> xoff(M * (Kp / 64) * kLanes);  // per chunk: -8 * each lane's activations
  quantise(x.data_ptr<float>(), M, K, Kp, xq.data(), sx.data(), nullptr, LaneOffsets{xoff.data(), -8, 64});
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / kRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 64 / kRows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_for<kRows>(xq.data(), sx.data(), xoff.data(), wp, dp, yp, M, Kp, N, b * kRows);
  });
  for (int64_t n = blocks * kRows; n < N; ++n) rows_for<1>(xq.data(), sx.data(), xoff.data(), wp, dp, yp, M, Kp, N, n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_vnni_linear", &int4_vnni_linear,
        "y = per-block int8(x) @ (nibbles - 8).T * per-group scale; x fp32 [M, K], w uint8 [N, Kp / 2], "
        "d fp16 [N, Kp / 32]");
}
