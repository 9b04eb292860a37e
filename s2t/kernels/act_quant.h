// Activations quantised to int8 per row and block of 128 inputs, shared by the integer kernels (int8_vnni.cpp,
// int4_vnni.cpp). Built with -mavx512vnni it uses AVX-512, else AVX2; both round the same way. Included by
// one translation unit each; its hash is part of their build flags (s2t/kernels/__init__.py), so an edit here
// rebuilds them.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kBlock = 128;  // inputs per activation scale; two 64-byte chunks
constexpr int64_t kLanes = 16;   // int32 lanes of one 64-byte chunk's dot products (dpbusd's, zmm)

// The sum of 16 float lanes in one fixed order (pairs 8 apart, then 4 apart, then 2, then 1: gcc's
// _mm512_reduce_add_ps), written out so that both kernels and any compiler round the same way.
inline float reduce16(__m256 lo, __m256 hi) {
  const __m256 t = _mm256_add_ps(hi, lo);
  const __m128 u = _mm_add_ps(_mm256_extractf128_ps(t, 1), _mm256_castps256_ps128(t));
  const __m128 v = _mm_add_ps(u, _mm_shuffle_ps(u, u, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(v) + _mm_cvtss_f32(_mm_shuffle_ps(v, v, _MM_SHUFFLE(1, 1, 1, 1)));
}

#if defined(__AVX512VNNI__)

// One full block of 128 inputs, vectorised: the same arithmetic as the scalar tail in quantise_row (float32
// x * (1 / s), rounded half to even by the default MXCSR mode, clamped to +-127). Returns the block's sum of xq.
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

inline float full_block_amax(const float* x) {
  __m512 m = _mm512_setzero_ps();
  for (int j = 0; j < kBlock; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
  return _mm512_reduce_max_ps(m);
}

#else  // AVX2

inline int32_t quantise_block(const float* x, float s_inv, int8_t* out) {
  const __m256 inv = _mm256_set1_ps(s_inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  // vpackssdw / vpacksswb interleave the two 128-bit halves: this puts the 32 bytes back in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sum = _mm256_setzero_si256();
  for (int j = 0; j < kBlock; j += 32) {
    __m256i v[4];
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * i), inv));
      v[i] = _mm256_min_epi32(_mm256_max_epi32(v[i], lo), hi);
      sum = _mm256_add_epi32(sum, v[i]);
    }
    // the values are within +-127 already, so the saturating packs only narrow
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_permutevar8x32_epi32(bytes, order));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int32_t total = 0;
  for (int i = 0; i < 8; ++i) total += lanes[i];
  return total;
}

inline float full_block_amax(const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < kBlock; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float amax = 0;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
  return amax;
}

#endif

inline float block_amax(const float* x, int64_t n) {
  if (n == kBlock) return full_block_amax(x);
  float amax = 0;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  return amax;
}

// Per-lane offset terms of the integer dot products, for kernels whose weights are stored with an offset
// (uint8 = q + 128, or 4-bit nibbles = q + 8): lanes [M, Kp / span, 16], lane i of a span holding
// mult * the sum of the xq at inputs 4i..4i+3 of each of its 64-input chunks (dpbusd's lane grouping).
struct LaneOffsets {
  int32_t* lanes = nullptr;  // null: not wanted
  int32_t mult = 0;
  int64_t span = kBlock;  // inputs per offset vector: a multiple of 64 dividing kBlock
};

// Quantise row m of x [M, K] to int8 [M, Kp] (zero-padded), one scale per block; corr[m] (if not null) is the
// offset term 128 * sum_b sx[m, b] * sum_{k in b} xq[m, k] that uint8 weights q + 128 add; `offsets`, the
// lane offsets above.
void quantise_row(const float* x, int64_t m, int64_t K, int64_t Kp, int8_t* xq, float* sx, float* corr,
                  LaneOffsets offsets) {
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
    if (offsets.lanes != nullptr) {  // zero-initialised by the caller
      const int64_t spans = Kp / offsets.span;
      for (int64_t k = k0; k < k0 + kBlock; ++k)
        offsets.lanes[(m * spans + k / offsets.span) * kLanes + (k % 64) / 4] += offsets.mult * out[k - k0];
    }
    sx[m * nb + b] = s;
    c += 128.0 * s * sum;
  }
  if (corr != nullptr) corr[m] = static_cast<float>(c);
}

void quantise(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* sx, float* corr,
              LaneOffsets offsets) {
  // rows are independent; a row of the 1.5B's down projection (8,960 inputs) is ~6 us of work
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantise_row(x, m, K, Kp, xq, sx, corr, offsets);
  });
}

}  // namespace
