// int8 x int8 linear for few to a few dozen rows, AVX-512 VNNI: the `int8_vnni` weight format.
//
// y[m, n] = scale[n] * sum_b sx[m, b] * sum_{k in block b} xq[m, k] * q[n, k]
//
// Weights: the same per-output-channel int8 values as the other int8 formats, stored offset by 128 as uint8
// (u = q + 128), rows padded with q = 0 to a multiple of 128 inputs. Activations: quantised on the fly to int8
// with one scale per row and block of 128 inputs (llama.cpp quantises activations the same way, per block,
// for its integer dot products; one scale per whole row had ~7x the KL against fp32 activations on the
// 0.5B, README issue #14).
//
// Why: packed fp32 spends 4 bytes per weight and the fp32 FMA kernel (int8_gemv.cpp) one multiply per
// weight and row; vpdpbusd multiplies 64 uint8 x int8 pairs into 16 int32 lanes per instruction, so rows
// cost 4x less compute and the weights 1 byte. The uint8 side must be the weights: dpbusd takes one
// unsigned operand, and sum_k (q + 128) x = sum_k q x + 128 sum_k x, whose correction depends only on the
// activation row (computed once per row, not per output).
//
// Every output depends only on its own activation row, in a fixed order: results do not change with the
// number of rows in the call (batch-invariant), unlike oneDNN's packed fp32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 128;  // inputs per activation scale; two 64-byte chunks

// One full block of 128 inputs, vectorised: the same arithmetic as the scalar tail below (float32 x * (1 / s),
// rounded half to even by the default MXCSR mode, clamped to +-127). Returns the block's sum of xq.
inline int32_t quantise_block(const float* x, float s_inv, int8_t* out) {
  const __m512 inv = _mm512_set1_ps(s_inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __m512i sum = _mm512_setzero_si512();
  for (int j = 0; j < kBlock; j += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), inv));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    sum = _mm512_add_epi32(sum, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(v));
  }
  return _mm512_reduce_add_epi32(sum);
}

inline float block_amax(const float* x, int64_t n) {
  if (n == kBlock) {
    __m512 m = _mm512_setzero_ps();
    for (int j = 0; j < kBlock; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
    return _mm512_reduce_max_ps(m);
  }
  float amax = 0;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

// Quantise row m of x [M, K] to int8 [M, Kp] (zero-padded), one scale per block; corr[m] is the offset term
// 128 * sum_b sx[m, b] * sum_{k in b} xq[m, k] that the uint8 weights add.
void quantise_row(const float* x, int64_t m, int64_t K, int64_t Kp, int8_t* xq, float* sx, float* corr) {
  const int64_t nb = Kp / kBlock;
  double c = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kBlock, n = std::min(K, k0 + kBlock) - k0;
    const float* xb = x + m * K + k0;
    const float amax = block_amax(xb, n);
    const float s = amax > 0 ? amax / 127.f : 1.f;
    const float inv = 1.f / s;
    int8_t* out = xq + m * Kp + k0;
    int32_t sum = 0;
    if (n == kBlock) {
      sum = quantise_block(xb, inv, out);
    } else {  // the last, partial block of a row whose length is not a multiple of 128
      for (int64_t k = 0; k < n; ++k) {
        const int32_t v = std::max(-127, std::min(127, static_cast<int32_t>(std::nearbyint(xb[k] * inv))));
        out[k] = static_cast<int8_t>(v);
        sum += v;
      }
      for (int64_t k = n; k < kBlock; ++k) out[k] = 0;
    }
    sx[m * nb + b] = s;
    c += 128.0 * s * sum;
  }
  corr[m] = static_cast<float>(c);
}

void quantise(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* sx, float* corr) {
  // rows are independent; a row of the 1.5B's down projection (8,960 inputs) is ~6 us of work
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantise_row(x, m, K, Kp, xq, sx, corr);
  });
}

// R output rows [n0, n0 + R) against MT activation rows [m0, m0 + MT).
template <int R, int MT>
inline void tile(const int8_t* xq, const float* sx, const float* corr, const uint8_t* u, const float* scale,
                 float* y, int64_t Kp, int64_t N, int64_t n0, int64_t m0, bool prefetch) {
  const int64_t nb = Kp / kBlock;
  __m512 facc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) facc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[R][MT];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) iacc[r][m] = _mm512_setzero_si512();
    for (int c = 0; c < kBlock / 64; ++c) {  // a constant trip count: unrolled
      const int64_t k = b * kBlock + c * 64;
      __m512i w[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* row = u + (n0 + r) * Kp + k;
        // short interleaved rows defeat the hardware prefetcher (see int8_gemv.cpp): fetch the next tile's
        if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(row + R * Kp), _MM_HINT_T0);
        w[r] = _mm512_loadu_si512(row);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq + (m0 + m) * Kp + k);
        for (int r = 0; r < R; ++r) iacc[r][m] = _mm512_dpbusd_epi32(iacc[r][m], w[r], xv);
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m512 s = _mm512_set1_ps(sx[(m0 + m) * nb + b]);
      for (int r = 0; r < R; ++r) facc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][m]), s, facc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m)
      y[(m0 + m) * N + n0 + r] = (_mm512_reduce_add_ps(facc[r][m]) - corr[m0 + m]) * scale[n0 + r];
}

// All M rows for output rows [n0, n0 + R): the R weight rows stay in L1 while every row tile passes.
template <int R>
inline void rows_for(const int8_t* xq, const float* sx, const float* corr, const uint8_t* u, const float* scale,
                     float* y, int64_t M, int64_t Kp, int64_t N, int64_t n0) {
  int64_t m0 = 0;
  // 2 * R * MT accumulators + R weight vectors + 1 activation vector within the 32 zmm registers, with room
  // to spare: at R = 4, MT = 3 (29 of 32) gcc spilled accumulators to the stack and reloaded weight vectors
  for (; m0 + 2 <= M; m0 += 2) tile<R, 2>(xq, sx, corr, u, scale, y, Kp, N, n0, m0, m0 == 0);
  for (; m0 < M; ++m0) tile<R, 1>(xq, sx, corr, u, scale, y, Kp, N, n0, m0, m0 == 0);
}

}  // namespace

torch::Tensor int8_vnni_linear(torch::Tensor x, torch::Tensor u, torch::Tensor scale, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && u.dim() == 2 && scale.dim() == 1, "int8_vnni_linear: x [M, K], u [N, Kp], scale [N]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int8_vnni_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(u.scalar_type() == torch::kUInt8, "int8_vnni_linear: u must be uint8, got ", u.scalar_type());
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32, "int8_vnni_linear: scale must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = u.size(0), Kp = u.size(1);
  TORCH_CHECK(K == in_features && Kp % kBlock == 0 && Kp >= K && Kp < K + kBlock && scale.size(0) == N,
              "int8_vnni_linear: shapes ", x.sizes(), " ", u.sizes(), " ", scale.sizes(), " do not match ",
              in_features, " inputs");
  x = x.contiguous();
  u = u.contiguous();
  scale = scale.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M * (Kp / kBlock)), corr(M);
  quantise(x.data_ptr<float>(), M, K, Kp, xq.data(), sx.data(), corr.data());
  const uint8_t* up = u.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int R = 4;
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 64 / R), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_for<R>(xq.data(), sx.data(), corr.data(), up, sp, yp, M, Kp, N, b * R);
  });
  for (int64_t n = blocks * R; n < N; ++n) rows_for<1>(xq.data(), sx.data(), corr.data(), up, sp, yp, M, Kp, N, n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_vnni_linear", &int8_vnni_linear,
        "y = per-block int8(x) @ (u - 128).T * scale; x fp32 [M, K], u uint8 [N, Kp], scale fp32 [N]");
}
