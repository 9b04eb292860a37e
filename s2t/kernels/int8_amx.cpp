// int8 x int8 linear on AMX tiles (Intel Xeon since Sapphire Rapids): the `int8_amx` weight format.
//
// y[m, n] = scale[n] * (sum_b sx[m, b] * sum_{k in block b} xq[m, k] * u[n, k]  -  corr[m])
//
// The same weights as int8_vnni (uint8 u = q + 128 per output channel, rows zero-padded to a multiple of 128
// inputs; a layer holding both formats holds one copy, s2t/weight_formats.py) and the same activations,
// quantised to int8 per row and block of 128 inputs (act_quant.h). Only the order of the float sums differs:
// int8_vnni keeps 16 int32 lanes per block and adds them at the end; here each block's dot product is one
// exact int32 (at most 128 * 255 * 127 < 2^24, so it is exact as a float too), scaled and added in block
// order. The two formats agree to float rounding, not bit for bit.
//
// Why: int8_vnni spends one vpdpbusd (64 multiply-adds) per 64 weight bytes and activation row, plus a
// convert and an FMA per block of 128; at 8 rows the 1.5B's verification forward then cost 2.2x a one-row
// step on a Sapphire Rapids core (412 against 189 ms, README issue #14), compute-bound. One AMX tdpbusd
// multiplies 16 weight rows by 16 activation rows over 64 inputs (16,384 multiply-adds), so up to 16 rows
// cost about what one does and the forward streams the weights at the memory's rate.
//
// Tiles: tmm0 and tmm5 accumulate C [16 weight rows x 16 activation rows] int32 for alternate blocks (the
// AMX unit fills one while the float epilogue reads the other); tmm1 / tmm2 hold A, the two 64-byte halves of
// a block of 16 weight rows (u, row stride Kp: no repacking); tmm3 / tmm4 the matching B, 16 activation rows
// in AMX's VNNI layout (B[k / 4][4 m + i] = xq[m, k + i]), repacked per call (activations are small).
//
// Every output depends only on its own activation row, in a fixed order: batch-invariant, like int8_vnni.
// Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM): the module asks once
// and `ready()` says whether it got it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "act_quant.h"
#include "amx_tiles.h"
#include "int8_args.h"

namespace {

constexpr int kTile = 16;        // weight rows per A tile; activation rows per B tile
constexpr int64_t kChunk = 64;   // inputs per tile (a 64-byte tile row)

// Tile configuration is per thread: every parallel chunk loads it and releases the tiles when done.
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Activations of rows [g * 16, g * 16 + 16) in B's layout: xb[k / 4][m][i] = xq[g * 16 + m, k + i]; rows past M
// are zero, so their products are zero and their outputs are not written.
void repack_group(const int8_t* xq, int64_t M, int64_t Kp, int64_t g, int8_t* xb) {
  std::memset(xb, 0, static_cast<size_t>(Kp) * kTile);
  for (int m = 0; m < kTile && g * kTile + m < M; ++m) {
    const int32_t* row = reinterpret_cast<const int32_t*>(xq + (g * kTile + m) * Kp);
    int32_t* out = reinterpret_cast<int32_t*>(xb) + m;
    for (int64_t q = 0; q < Kp / 4; ++q) out[q * kTile] = row[q];
  }
}

// One block of 128 inputs into C tile `C` (0 or 5): two tdpbusd over its 64-byte halves. A macro: gcc's tile
// intrinsics are macros that paste their tile numbers into the instruction, so they take literals only.
#define S2T_BLOCK_PRODUCT(C, a, Kp, b, cbuf) \
  do {                                      \
    _tile_zero(C);                          \
    _tile_loadd(1, (a), (Kp));              \
    _tile_loadd(3, (b), 64);                \
    _tile_dpbusd(C, 1, 3);                  \
    _tile_loadd(2, (a) + kChunk, (Kp));     \
    _tile_loadd(4, (b) + kChunk / 4 * 64, 64); \
    _tile_dpbusd(C, 2, 4);                  \
    _tile_stored(C, (cbuf), 64);            \
  } while (0)

// acc[r] (lanes = activation rows) += float(C[r]) * the block's activation scales
inline void scale_into(const int32_t* cbuf, const float* sxb, __m512 acc[kTile]) {
  const __m512 s = _mm512_loadu_ps(sxb);
  for (int r = 0; r < kTile; ++r)
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cbuf + r * kTile)), s, acc[r]);
}

// The 16 weight rows of the block kAhead blocks on in the order this thread reads them (row tile by row tile,
// each left to right), two cache lines each, into L1. Sixteen short rows read side by side defeat the
// hardware prefetcher (as int8_vnni's four do, int8_gemv.cpp): measured on the 1.5B's gate/up shape at one
// row, without this the kernel streamed 4.1 GB/s against int8_vnni's 10.7. How far: 4 blocks (the 16 rows'
// next 8 KB) rather than 8, which over-fetched. One thread, matrices of the 1.5B cycled from memory, ms at 1 / 5 / 8
// rows, 8 -> 4 blocks ahead (2 and 3 within 3 % of 4; 6, 16 and 24 slower): gate/up 2.56 / 2.59 / 2.62 -> 2.36 / 2.38 /
// 2.44, down 1.00 / 1.04 / 1.05 -> 0.96 / 1.00 / 1.00, lm_head 20.5 / 21.0 / 21.0 -> 19.1 / 19.7 / 19.8 (README,
// issue #14).
constexpr int64_t kAhead = 4;

inline void prefetch_ahead(const uint8_t* u, int64_t Kp, int64_t nb, int64_t t, int64_t t_end, int64_t b) {
  const int64_t at = t * nb + b + kAhead, tile = at / nb;
  if (tile >= t_end) return;
  const uint8_t* rows = u + tile * kTile * Kp + (at % nb) * kBlock;
  for (int r = 0; r < kTile; ++r) {
    const char* p = reinterpret_cast<const char*>(rows + r * Kp);
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + 64, _MM_HINT_T0);
  }
}

// Output rows [16 t, 16 t + 16) for activation rows [16 g, 16 g + 16) of M; the first group prefetches the
// weights, up to tile t_end.
void tile_rows(const uint8_t* u, const int8_t* xb, const float* sxt, const float* corr, const float* scale,
               float* y, int64_t M, int64_t Kp, int64_t N, int64_t t, int64_t t_end, int64_t g) {
  const int64_t n0 = t * kTile;
  const int64_t fetch_to = g == 0 ? t_end : 0;
  const int64_t nb = Kp / kBlock;
  alignas(64) int32_t cbuf[2][kTile * kTile];
  __m512 acc[kTile];
  for (int r = 0; r < kTile; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* a = u + n0 * Kp;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    prefetch_ahead(u, Kp, nb, t, fetch_to, b);
    prefetch_ahead(u, Kp, nb, t, fetch_to, b + 1);
    S2T_BLOCK_PRODUCT(0, a + b * kBlock, Kp, xb + b * kBlock * kTile, cbuf[0]);
    S2T_BLOCK_PRODUCT(5, a + (b + 1) * kBlock, Kp, xb + (b + 1) * kBlock * kTile, cbuf[1]);
    scale_into(cbuf[0], sxt + b * kTile, acc);
    scale_into(cbuf[1], sxt + (b + 1) * kTile, acc);
  }
  if (b < nb) {
    prefetch_ahead(u, Kp, nb, t, fetch_to, b);
    S2T_BLOCK_PRODUCT(0, a + b * kBlock, Kp, xb + b * kBlock * kTile, cbuf[0]);
    scale_into(cbuf[0], sxt + b * kTile, acc);
  }
  alignas(64) float dots[kTile][kTile];
  for (int r = 0; r < kTile; ++r) _mm512_store_ps(dots[r], acc[r]);
  for (int m = 0; m < kTile && g * kTile + m < M; ++m) {
    const int64_t row = g * kTile + m;
    for (int r = 0; r < kTile; ++r) y[row * N + n0 + r] = (dots[r][m] - corr[row]) * scale[n0 + r];
  }
}

// Output rows past the last whole tile of 16 (none in the Qwen2 shapes): the same sums, one at a time.
void tail_row(const uint8_t* u, const int8_t* xq, const float* sx, const float* corr, const float* scale, float* y,
              int64_t M, int64_t Kp, int64_t N, int64_t n) {
  const int64_t nb = Kp / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t dot = 0;
      for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k)
        dot += static_cast<int32_t>(u[n * Kp + k]) * static_cast<int32_t>(xq[m * Kp + k]);
      acc = std::fma(static_cast<float>(dot), sx[m * nb + b], acc);
    }
    y[m * N + n] = (acc - corr[m]) * scale[n];
  }
}

}  // namespace

bool ready() { return amx_permitted(); }

torch::Tensor int8_amx_linear(torch::Tensor x, torch::Tensor u, torch::Tensor scale, int64_t in_features) {
  TORCH_CHECK(amx_permitted(), "int8_amx_linear: Linux did not grant this process the AMX tile state (arch_prctl)");
  auto y = int8_linear_output("int8_amx_linear", x, u, scale, in_features, kBlock);
  const int64_t M = x.size(0), K = x.size(1), N = u.size(0), Kp = u.size(1);
  if (M == 0) return y;
  const int64_t nb = Kp / kBlock, groups = (M + kTile - 1) / kTile;
  std::vector<int8_t> xq(M * Kp);
  std::vector<float> sx(M * nb), corr(M);
  quantise(x.data_ptr<float>(), M, K, Kp, xq.data(), sx.data(), corr.data(), LaneOffsets{});
  // per group of 16 activation rows: B's layout, and the scales transposed to [block][row] (zero past M)
  std::vector<int8_t> xb(groups * Kp * kTile);
  std::vector<float> sxt(groups * nb * kTile, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    repack_group(xq.data(), M, Kp, g, xb.data() + g * Kp * kTile);
    for (int64_t m = 0; m < kTile && g * kTile + m < M; ++m)
      for (int64_t b = 0; b < nb; ++b) sxt[(g * nb + b) * kTile + m] = sx[(g * kTile + m) * nb + b];
  }
  const uint8_t* up = u.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t tiles = N / kTile;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    configure_tiles();
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t g = 0; g < groups; ++g)
        tile_rows(up, xb.data() + g * Kp * kTile, sxt.data() + g * nb * kTile, corr.data(), sp, yp, M, Kp, N,
                  t, t1, g);
    _tile_release();
  });
  for (int64_t n = tiles * kTile; n < N; ++n) tail_row(up, xq.data(), sx.data(), corr.data(), sp, yp, M, Kp, N, n);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_amx_linear", &int8_amx_linear,
        "y = per-block int8(x) @ (u - 128).T * scale on AMX tiles; x fp32 [M, K], u uint8 [N, Kp], scale fp32 [N]");
  m.def("ready", &ready, "whether Linux granted this process the AMX tile state");
}
