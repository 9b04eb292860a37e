// A probe, not a weight format (bench/amx_layout_probe.py builds and times it beside s2t's kernels): int8 weights
// stored in AMX's B layout, the activation rows in A.
//
// y[m, n] = scale[n] * (sum_b sx[m, b] * sum_{k in block b} xq[m, k] * u[n, k]  -  corr[m])
//
// The same numbers as int8_amx up to the order of float sums (u = q + 128 per output channel, activations per
// row and block of 128 inputs, act_quant.h), in another layout. int8_amx keeps the weights row-major (shared
// with int8_vnni) and puts 16 weight rows in A and 16 activation rows in B, so every block's float epilogue
// walks 16 weight rows whatever the number of activation rows. Here a band of 16 outputs is one contiguous
// stream of B tiles (per 64-input chunk: 16 rows of kq, each 16 outputs x 4 inputs), A holds only the M <= 16
// activation rows asked for (tdpbsud: signed activations, unsigned weights), and the epilogue does one FMA per
// activation row. One row goes through AVX-512 VNNI on the same layout instead (vpdpbusd of a 64-byte B row
// against 4 broadcast inputs), so one copy of the weights would serve every row count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "act_quant.h"
#include "amx_tiles.h"

namespace {

constexpr int kTile = 16;        // outputs per band; at most this many activation rows per A tile
constexpr int64_t kChunk = 64;   // inputs per tile row
constexpr int64_t kRowAhead = 4;  // blocks the one-row path prefetches ahead (measured: 4 beat 0 and 16)

// C (tiles 0 and 5) and A (1, 2): mt rows; B (3, 4): 16 rows of kq.
void configure(int mt) {
  TileConfig cfg;
  for (int t : {0, 5, 1, 2}) {
    cfg.rows[t] = mt;
    cfg.colsb[t] = 64;
  }
  for (int t : {3, 4}) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// One block of 128 inputs into C tile `C`: its two chunks. A macro: the tile intrinsics take literal tile numbers.
#define PROBE_BLOCK(C, x, Kp, w, cbuf)              \
  do {                                              \
    _tile_zero(C);                                  \
    _tile_loadd(1, (x), (Kp));                      \
    _tile_loadd(3, (w), 64);                        \
    _tile_dpbsud(C, 1, 3);                          \
    _tile_loadd(2, (x) + kChunk, (Kp));             \
    _tile_loadd(4, (w) + kTile * kChunk, 64);       \
    _tile_dpbsud(C, 2, 4);                          \
    _tile_stored(C, (cbuf), 64);                    \
  } while (0)

// Outputs [16 t, 16 t + 16) for activation rows [m0, m0 + mt). Block b's epilogue runs after block b + 1's tile
// instructions are issued, so its C tile's store has landed by then.
void band_tiles(const uint8_t* w, const int8_t* xq, const float* sx, const float* corr, const float* scale,
                float* y, int64_t Kp, int64_t N, int64_t t, int64_t m0, int mt) {
  const int64_t nb = Kp / kBlock;
  const uint8_t* wb = w + t * kTile * Kp;
  const int8_t* x = xq + m0 * Kp;
  const float* s = sx + m0 * nb;
  alignas(64) int32_t cbuf[2][kTile * kTile];
  __m512 acc[kTile];
  for (int m = 0; m < mt; ++m) acc[m] = _mm512_setzero_ps();
  auto epilogue = [&](int64_t b) {
    const int32_t* c = cbuf[b & 1];
    for (int m = 0; m < mt; ++m)
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + m * kTile)), _mm512_set1_ps(s[m * nb + b]),
                               acc[m]);
  };
  for (int64_t b = 0; b < nb; ++b) {
    if (b & 1)
      PROBE_BLOCK(5, x + b * kBlock, Kp, wb + b * kBlock * kTile, cbuf[1]);
    else
      PROBE_BLOCK(0, x + b * kBlock, Kp, wb + b * kBlock * kTile, cbuf[0]);
    if (b > 0) epilogue(b - 1);
  }
  epilogue(nb - 1);
  const __m512 sc = _mm512_loadu_ps(scale + t * kTile);
  for (int m = 0; m < mt; ++m)
    _mm512_storeu_ps(y + (m0 + m) * N + t * kTile, _mm512_mul_ps(_mm512_sub_ps(acc[m], _mm512_set1_ps(corr[m0 + m])), sc));
}

// One activation row: per 64-byte B row (16 outputs x 4 inputs), one vpdpbusd against the 4 inputs broadcast.
void band_row(const uint8_t* w, const int8_t* x, const float* sx, float corr, const float* scale, float* y,
              int64_t Kp, int64_t t, int64_t t_end) {
  const int64_t nb = Kp / kBlock;
  const uint8_t* wb = w + t * kTile * Kp;
  const uint8_t* end = w + t_end * kTile * Kp;
  __m512 facc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* wk = wb + b * kBlock * kTile;
    const uint8_t* ahead = wk + kRowAhead * kBlock * kTile;
    if (ahead < end)
      for (int i = 0; i < kBlock * kTile / 64; ++i) _mm_prefetch(reinterpret_cast<const char*>(ahead + 64 * i), _MM_HINT_T0);
    const int32_t* xk = reinterpret_cast<const int32_t*>(x + b * kBlock);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;  // four chains: vpdpbusd's latency
    for (int q = 0; q < 32; q += 4) {
      a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(wk + (q + 0) * 64), _mm512_set1_epi32(xk[q + 0]));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(wk + (q + 1) * 64), _mm512_set1_epi32(xk[q + 1]));
      a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(wk + (q + 2) * 64), _mm512_set1_epi32(xk[q + 2]));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512(wk + (q + 3) * 64), _mm512_set1_epi32(xk[q + 3]));
    }
    const __m512i sum = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
    facc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(sx[b]), facc);
  }
  _mm512_storeu_ps(y + t * kTile,
                   _mm512_mul_ps(_mm512_sub_ps(facc, _mm512_set1_ps(corr)), _mm512_loadu_ps(scale + t * kTile)));
}

}  // namespace

// x fp32 [M, K]; w uint8 [N, Kp] in the B layout (bench/amx_layout_probe.py: b_layout()); scale fp32 [N]
torch::Tensor b_layout_linear(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t in_features) {
  TORCH_CHECK(amx_permitted(), "b_layout_linear: Linux did not grant this process the AMX tile state");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), Kp = w.size(1);
  TORCH_CHECK(K == in_features && N % kTile == 0 && Kp % kBlock == 0 && Kp >= K, "b_layout_linear: shapes");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const int64_t nb = Kp / kBlock, tiles = N / kTile;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M * nb), corr(M);
  quantise(x.data_ptr<float>(), M, K, Kp, xq.data(), sx.data(), corr.data(), LaneOffsets{});
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M == 1) {
    at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) band_row(wp, xq.data(), sx.data(), corr[0], sp, yp, Kp, t, t1);
    });
    return y;
  }
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += kTile) {
      const int mt = static_cast<int>(std::min<int64_t>(kTile, M - m0));
      configure(mt);
      for (int64_t t = t0; t < t1; ++t) band_tiles(wp, xq.data(), sx.data(), corr.data(), sp, yp, Kp, N, t, m0, mt);
    }
    _tile_release();
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("b_layout_linear", &b_layout_linear, "int8_amx's numbers with the weights in AMX's B layout (a probe)");
}
