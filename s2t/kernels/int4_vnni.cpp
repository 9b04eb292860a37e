// 4-bit weights x int8 activations for few to a few dozen rows: the `int4_vnni` weight format.
//
// y[m, n] = sum_g sx[m, b(g)] * (d[n, g] * sum_{k in g} xq[m, k] * u[n, k] + mn[n, g] * sum_{k in g} xq[m, k])
//
// Weights: 4-bit values u in [0, 15] on an affine grid per group of 32 inputs, w = d * u + mn, with a float16
// step d and offset mn per group (llama.cpp's Q4_1 layout of information: 5 bits per weight); rows zero-padded
// to a multiple of 128 inputs. Stored as nibbles: byte j of each 64-input chunk holds input j in its low
// nibble and input j + 32 in its high one, so one AND and one shift give the chunk's 64 values in input
// order. Activations: quantised to int8 per row and block of 128 inputs, exactly as int8_vnni does
// (act_quant.h).
//
// Why: a decode step at batch 1 reads every weight once and is bounded by memory bandwidth; int8 reads
// 1 byte per weight (1.55 GB per token for the 1.5B), this format 0.625. vpdpbusd takes the nibbles as its
// uint8 operand: lanes 0-7 / 8-15 of a chunk's dot product are its first / second group of 32 inputs, scaled
// by their own steps; the offsets' term is a short dot product of each row's offsets with the activations'
// per-group sums. An affine grid, not a symmetric one (Q4_0): the 1.5B ships as Q4_K, itself affine per
// 32 inputs, and on its layers 3 and 20 the affine grid had about half the symmetric one's relative error
// (0.042-0.054 against 0.071-0.101).
//
// Every output depends only on its own activation row, in a fixed order (batch-invariant).
//
// Two builds of this one source (s2t/kernels/__init__.py), as for int8_vnni: with -mavx512vnni the AVX-512
// VNNI kernel; without, an AVX2 one. Here the AVX2 build needs no sign trick: the nibbles u are at most 15,
// so vpmaddubsw's int16 pair sums (u * x, at most 2 * 15 * 128) cannot saturate, and vpmaddwd by ones then
// gives exactly dpbusd's int32 lanes (lanes 0-7 of a chunk in one register, 8-15 in another). The float steps
// that follow are the same operations on the same lanes in the same order, so the two builds' outputs are
// bit-identical (tests/test_kernel_int4.py checks it where both run).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

#include "act_quant.h"
#include "prefetch.h"

namespace {

constexpr int64_t kGroup = 32;  // inputs per weight step and offset

// The offsets' term of one output: its 4 lanes (a block's 4 groups, summed over blocks) added pairwise, in the
// same order in both builds.
inline float offsets(__m128 o) {
  o = _mm_add_ps(o, _mm_shuffle_ps(o, o, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(o) + _mm_cvtss_f32(_mm_shuffle_ps(o, o, _MM_SHUFFLE(1, 1, 1, 1)));
}

// Where chunk c of block b starts in activation row m0's quantised inputs.
inline int64_t chunk_offset(int64_t m0, int64_t Kp, int64_t b, int c) { return m0 * Kp + (b * 2 + c) * 64; }

#if defined(__AVX512VNNI__)

constexpr int kRows = 4;  // output rows per tile

// R output rows [n0, n0 + R) against MT activation rows [m0, m0 + MT). xs: per activation row and group,
// sx * the group's sum of xq (the offsets' multiplier).
template <int R, int MT>
inline void tile(const int8_t* xq, const float* sx, const float* xs, const uint8_t* w, const at::Half* d,
                 const at::Half* mn, float* y, int64_t Kp, int64_t N, int64_t n0, int64_t m0,
                 const Prefetch& pf) {
  const int64_t nb = Kp / kBlock, ng = Kp / kGroup, row_bytes = Kp / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // lanes 0-7 take the chunk's first group step, 8-15 its second
  const __m512i first = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 facc[R][MT];
  __m128 oacc[R][MT];  // the offsets' term, 4 groups at a time
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      facc[r][m] = _mm512_setzero_ps();
      oacc[r][m] = _mm_setzero_ps();
    }
  for (int64_t b = 0; b < nb; ++b) {
    __m512 sxv[MT];
    __m128 xs4[MT];
    for (int m = 0; m < MT; ++m) {
      sxv[m] = _mm512_set1_ps(sx[(m0 + m) * nb + b]);
      xs4[m] = _mm_loadu_ps(xs + (m0 + m) * ng + b * 4);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + (n0 + r) * row_bytes + b * (kBlock / 2);
      if (pf.covers(r)) _mm_prefetch(reinterpret_cast<const char*>(row + pf.ahead), _MM_HINT_T0);
      // the block's 4 group steps and offsets, float16 -> float32
      const int64_t g0 = (n0 + r) * ng + b * 4;
      const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d + g0)));
      const __m128 mn4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g0)));
      for (int m = 0; m < MT; ++m) oacc[r][m] = _mm_fmadd_ps(mn4, xs4[m], oacc[r][m]);
      const __m512 d512 = _mm512_castps128_ps512(d4);
      const __m512 dv[2] = {_mm512_permutexvar_ps(first, d512), _mm512_permutexvar_ps(second, d512)};
      for (int c = 0; c < 2; ++c) {  // the block's two 64-input chunks
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 32));
        const __m256i lo = _mm256_and_si256(packed, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        const __m512i u = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        const int8_t* x = xq + chunk_offset(m0, Kp, b, c);
        for (int m = 0; m < MT; ++m) {
          const __m512i xv = _mm512_loadu_si512(x + m * Kp);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
          facc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv[c], sxv[m]), facc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(facc[r][m]), 1));
      y[(m0 + m) * N + n0 + r] = reduce16(_mm512_castps512_ps256(facc[r][m]), hi) + offsets(oacc[r][m]);
    }
}

#else  // AVX2

// Two output rows per tile: per (row, activation row) two float accumulators and one offsets' accumulator,
// 12 of the 16 ymm registers at MT = 2 before the weights and steps (the int8_vnni AVX2 build's shape).
constexpr int kRows = 2;

template <int R, int MT>
inline void tile(const int8_t* xq, const float* sx, const float* xs, const uint8_t* w, const at::Half* d,
                 const at::Half* mn, float* y, int64_t Kp, int64_t N, int64_t n0, int64_t m0,
                 const Prefetch& pf) {
  const int64_t nb = Kp / kBlock, ng = Kp / kGroup, row_bytes = Kp / 2;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 flo[R][MT], fhi[R][MT];  // dpbusd's lanes 0-7 and 8-15
  __m128 oacc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      flo[r][m] = fhi[r][m] = _mm256_setzero_ps();
      oacc[r][m] = _mm_setzero_ps();
    }
  for (int64_t b = 0; b < nb; ++b) {
    __m256 sxv[MT];
    __m128 xs4[MT];
    for (int m = 0; m < MT; ++m) {
      sxv[m] = _mm256_set1_ps(sx[(m0 + m) * nb + b]);
      xs4[m] = _mm_loadu_ps(xs + (m0 + m) * ng + b * 4);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + (n0 + r) * row_bytes + b * (kBlock / 2);
      if (pf.covers(r)) _mm_prefetch(reinterpret_cast<const char*>(row + pf.ahead), _MM_HINT_T0);
      const int64_t g0 = (n0 + r) * ng + b * 4;
      const __m128 d4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d + g0)));
      const __m128 mn4 = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn + g0)));
      for (int m = 0; m < MT; ++m) oacc[r][m] = _mm_fmadd_ps(mn4, xs4[m], oacc[r][m]);
      alignas(16) float steps[4];
      _mm_store_ps(steps, d4);
      for (int c = 0; c < 2; ++c) {  // the block's two 64-input chunks: groups 2c (low nibbles), 2c + 1 (high)
        const __m256 dlo = _mm256_set1_ps(steps[2 * c]), dhi = _mm256_set1_ps(steps[2 * c + 1]);
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 32));
        const __m256i lo = _mm256_and_si256(packed, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        const int8_t* x = xq + chunk_offset(m0, Kp, b, c);
        for (int m = 0; m < MT; ++m) {
          const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * Kp));
          const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * Kp + 32));
          const __m256i dot_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xlo), ones);
          const __m256i dot_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xhi), ones);
          flo[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_lo), _mm256_mul_ps(dlo, sxv[m]), flo[r][m]);
          fhi[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_hi), _mm256_mul_ps(dhi, sxv[m]), fhi[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n0 + r] = reduce16(flo[r][m], fhi[r][m]) + offsets(oacc[r][m]);
}

#endif

template <int R>
inline void rows_for(const int8_t* xq, const float* sx, const float* xs, const uint8_t* w, const at::Half* d,
                     const at::Half* mn, float* y, int64_t M, int64_t Kp, int64_t N, int64_t n0) {
  const int passes = static_cast<int>((M + 1) / 2);
  Prefetch pf{0, passes, prefetch_bands(passes) * R * (Kp / 2)};
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2, ++pf.pass) tile<R, 2>(xq, sx, xs, w, d, mn, y, Kp, N, n0, m0, pf);
  for (; m0 < M; ++m0, ++pf.pass) tile<R, 1>(xq, sx, xs, w, d, mn, y, Kp, N, n0, m0, pf);
}

}  // namespace

torch::Tensor int4_vnni_linear(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor mn,
                               int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && d.dim() == 2 && mn.dim() == 2,
              "int4_vnni_linear: x [M, K], w [N, Kp / 2], d and mn [N, Kp / 32]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "int4_vnni_linear: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == torch::kUInt8, "int4_vnni_linear: w must be uint8, got ", w.scalar_type());
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && mn.scalar_type() == torch::kFloat16,
              "int4_vnni_linear: d and mn must be float16, got ", d.scalar_type(), " and ", mn.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1) * 2;
  TORCH_CHECK(K == in_features && Kp % kBlock == 0 && Kp >= K && Kp < K + kBlock && d.size(0) == N &&
                  d.size(1) == Kp / kGroup && mn.sizes() == d.sizes(),
              "int4_vnni_linear: shapes ", x.sizes(), " ", w.sizes(), " ", d.sizes(), " ", mn.sizes(),
              " do not match ", in_features, " inputs");
  x = x.contiguous();
  w = w.contiguous();
  d = d.contiguous();
  mn = mn.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const int64_t nb = Kp / kBlock, ng = Kp / kGroup;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M * nb), xs(M * ng);
  quantise(x.data_ptr<float>(), M, K, Kp, xq.data(), sx.data(), nullptr, LaneOffsets{});
  at::parallel_for(0, M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < ng; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) sum += xq[m * Kp + k];
        xs[m * ng + g] = sx[m * nb + g * kGroup / kBlock] * static_cast<float>(sum);
      }
  });
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* dp = d.data_ptr<at::Half>();
  const at::Half* mp = mn.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / kRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 64 / kRows), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      rows_for<kRows>(xq.data(), sx.data(), xs.data(), wp, dp, mp, yp, M, Kp, N, b * kRows);
  });
  for (int64_t n = blocks * kRows; n < N; ++n) rows_for<1>(xq.data(), sx.data(), xs.data(), wp, dp, mp, yp, M, Kp, N, n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_vnni_linear", &int4_vnni_linear,
        "y = per-block int8(x) @ (d * nibbles + mn).T per group of 32; x fp32 [M, K], w uint8 [N, Kp / 2], "
        "d and mn fp16 [N, Kp / 32]");
}
