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
//
// Two builds of this one source (s2t/kernels/__init__.py): with -mavx512vnni the AVX-512 VNNI kernel above;
// without, an AVX2 kernel for the machines that lack VNNI (most AVX2-only x86 CPUs). AVX2 has no
// uint8 x int8 dot product into int32 without saturation (vpmaddubsw saturates its int16 pair sums at
// 255 * 127 * 2), so it multiplies the signed weights q = u - 128 by the activations with the sign trick
// llama.cpp uses (|q| x sign(x, q): pairs of at most 2 * 127 * 127 fit in int16), and starts each lane's
// integer sum at the offset term 128 * sum xq of that lane's activations: its int32 lanes are then exactly
// dpbusd's (lane i of a 64-byte chunk covers its bytes 4i..4i+3; the AVX2 kernel keeps lanes 0-7 and 8-15 in
// two registers), the float steps that follow are the same operations in the same order, and the two
// kernels' outputs are bit-identical (tests/test_kernel_vnni.py checks it where both run).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <vector>

#include "act_quant.h"
#include "int8_args.h"
#include "prefetch.h"

namespace {

#if defined(__AVX512VNNI__)

constexpr bool kNeedsLaneOffsets = false;
constexpr int kRowsPerBlock = 4;  // output rows per tile

// R output rows [n0, n0 + R) against MT activation rows [m0, m0 + MT).
template <int R, int MT>
inline void tile(const int8_t* xq, const float* sx, const float* corr, const int32_t* /*xoff*/, const uint8_t* u,
                 const float* scale, float* y, int64_t Kp, int64_t N, int64_t n0, int64_t m0,
                 const Prefetch& pf) {
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
        // short interleaved rows defeat the hardware prefetcher (see int8_gemv.cpp): fetch a later tile's, into L2
        // (T1: more lines in flight than L1's fill buffers allow), except in a lone pass of two rows, where it
        // gained nothing (prefetch.h has the figures)
        if (pf.covers(r)) {
          if (MT == 2 && pf.passes == 1) _mm_prefetch(reinterpret_cast<const char*>(row + pf.ahead), _MM_HINT_T0);
          else _mm_prefetch(reinterpret_cast<const char*>(row + pf.ahead), _MM_HINT_T1);
        }
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
    for (int m = 0; m < MT; ++m) {
      // the upper half through the pd extract: AVX-512 F has it, the ps one needs DQ
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(facc[r][m]), 1));
      const float dot = reduce16(_mm512_castps512_ps256(facc[r][m]), hi);
      y[(m0 + m) * N + n0 + r] = (dot - corr[m0 + m]) * scale[n0 + r];
    }
}

#else  // AVX2

constexpr bool kNeedsLaneOffsets = true;
constexpr int kRowsPerBlock = 2;

// The same tile with 256-bit registers: lanes 0-7 of dpbusd's 16 in `lo`, 8-15 in `hi`. Per (row, activation
// row) two int32 and two float accumulators: at R = 2, MT = 1 they fit the 16 ymm registers with the weights;
// at MT = 2 some spill, which still beat re-reading the weights per activation row (one-thread
// micro-benchmark of the 1.5B's up projection at 4 rows, beside a running benchmark: 2.1 against 2.8 ms).
template <int R, int MT>
inline void tile(const int8_t* xq, const float* sx, const float* corr, const int32_t* xoff, const uint8_t* u,
                 const float* scale, float* y, int64_t Kp, int64_t N, int64_t n0, int64_t m0,
                 const Prefetch& pf) {
  const int64_t nb = Kp / kBlock;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));  // u ^ 0x80 = u - 128 = q, as int8
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 flo[R][MT], fhi[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) flo[r][m] = fhi[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i ilo[R][MT], ihi[R][MT];
    for (int m = 0; m < MT; ++m) {
      const int32_t* off = xoff + ((m0 + m) * nb + b) * kLanes;
      const __m256i olo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off));
      const __m256i ohi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + 8));
      for (int r = 0; r < R; ++r) {
        ilo[r][m] = olo;
        ihi[r][m] = ohi;
      }
    }
    for (int c = 0; c < kBlock / 32; ++c) {  // 32-byte halves of the two 64-byte chunks: even ones lo, odd hi
      const int64_t k = b * kBlock + c * 32;
      __m256i q[R], aq[R];
      for (int r = 0; r < R; ++r) {
        const uint8_t* row = u + (n0 + r) * Kp + k;
        if (c % 2 == 0 && pf.covers(r)) _mm_prefetch(reinterpret_cast<const char*>(row + pf.ahead), _MM_HINT_T0);
        q[r] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)), flip);
        aq[r] = _mm256_abs_epi8(q[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (m0 + m) * Kp + k));
        for (int r = 0; r < R; ++r) {
          // |q| * sign(x, q) = q * x per byte; pairs summed in int16 (at most 2 * 127 * 127), then quads in int32
          const __m256i quads = _mm256_madd_epi16(_mm256_maddubs_epi16(aq[r], _mm256_sign_epi8(xv, q[r])), ones);
          if (c % 2 == 0) ilo[r][m] = _mm256_add_epi32(ilo[r][m], quads);
          else ihi[r][m] = _mm256_add_epi32(ihi[r][m], quads);
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 s = _mm256_set1_ps(sx[(m0 + m) * nb + b]);
      for (int r = 0; r < R; ++r) {
        flo[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ilo[r][m]), s, flo[r][m]);
        fhi[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ihi[r][m]), s, fhi[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m)
      y[(m0 + m) * N + n0 + r] = (reduce16(flo[r][m], fhi[r][m]) - corr[m0 + m]) * scale[n0 + r];
}

#endif

// All M rows for output rows [n0, n0 + R), either build: the R weight rows stay in L1 while every row tile
// passes. Tiles of 2 activation rows: in the AVX-512 build 2 * R * MT accumulators + R weight vectors + 1
// activation vector fit the 32 zmm registers with room to spare (at R = 4, MT = 3, 29 of 32, gcc spilled
// accumulators and reloaded weight vectors); the AVX2 build's spill is measured above its tile.
template <int R>
inline void rows_for(const int8_t* xq, const float* sx, const float* corr, const int32_t* xoff, const uint8_t* u,
                     const float* scale, float* y, int64_t M, int64_t Kp, int64_t N, int64_t n0) {
  const int passes = static_cast<int>((M + 1) / 2);
  Prefetch pf{0, passes, prefetch_bands(passes) * R * Kp};
  int64_t m0 = 0;
  for (; m0 + 2 <= M; m0 += 2, ++pf.pass) tile<R, 2>(xq, sx, corr, xoff, u, scale, y, Kp, N, n0, m0, pf);
  for (; m0 < M; ++m0, ++pf.pass) tile<R, 1>(xq, sx, corr, xoff, u, scale, y, Kp, N, n0, m0, pf);
}

}  // namespace

torch::Tensor int8_vnni_linear(torch::Tensor x, torch::Tensor u, torch::Tensor scale, int64_t in_features) {
  auto y = int8_linear_output("int8_vnni_linear", x, u, scale, in_features, kBlock);
  const int64_t M = x.size(0), K = x.size(1), N = u.size(0), Kp = u.size(1);
  if (M == 0) return y;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M * (Kp / kBlock)), corr(M);
  std::vector<int32_t> xoff(kNeedsLaneOffsets ? M * (Kp / kBlock) * kLanes : 0);
  int32_t* xo = kNeedsLaneOffsets ? xoff.data() : nullptr;
  quantise(x.data_ptr<float>(), M, K, Kp, xq.data(), sx.data(), corr.data(), LaneOffsets{xo, 128, kBlock});
  const uint8_t* up = u.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int R = kRowsPerBlock;
  const int64_t blocks = N / R;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 64 / R), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_for<R>(xq.data(), sx.data(), corr.data(), xo, up, sp, yp, M, Kp, N, b * R);
  });
  for (int64_t n = blocks * R; n < N; ++n) rows_for<1>(xq.data(), sx.data(), corr.data(), xo, up, sp, yp, M, Kp, N, n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_vnni_linear", &int8_vnni_linear,
        "y = per-block int8(x) @ (u - 128).T * scale; x fp32 [M, K], u uint8 [N, Kp], scale fp32 [N]");
}
