// How the integer kernels (int8_vnni.cpp, int4_vnni.cpp) prefetch their weights when a call has several activation
// rows. Its hash is part of their build flags (s2t/kernels/__init__.py), so an edit here rebuilds them.
#pragma once

#include <cstdint>

namespace {

// Which weight rows a pass over a band of R output rows prefetches, and how far ahead. A call of M activation rows
// passes over each band ceil(M / 2) times (tiles of two activation rows, rows_for); the first pass used to fetch
// all of the next band and the others none, so memory idled while they computed and a forward of 3-8 rows cost
// 1.1-1.6x one row. Spread over the passes (pass p fetches the band rows r with r % passes == p) and two bands
// ahead (prefetch_bands), memory streams while every pass computes: int8_vnni (AVX-512 build), one thread, the
// 1.5B's gate/up (17,920 x 1,536) cycled from memory, 2.45 / 2.59 / 3.06 -> 2.33 / 2.35 / 2.75 ms at 3 / 4 / 6
// rows, one row unchanged (README, issue #14). Prefetches change no arithmetic: the outputs are bit for bit the
// same.
struct Prefetch {
  int pass;
  int passes;
  int64_t ahead;  // bytes from the row being read to the one fetched
  bool covers(int r) const { return r % passes == pass; }
};
// Bands ahead: two when a band has several passes (at 8 rows, 4 passes, one band ahead left the 1.5B's gate/up at
// 3.53 ms against 3.00), one for a single pass, as before. The AVX-512 int8_vnni fetches into L2 (prefetcht1)
// rather than L1, more lines in flight than L1's fill buffers allow: forwards of 3-4 rows 0.89-0.96x, one row
// 0.98-0.99x (within noise). A lone pass of two rows keeps T0: T1 measured 1.00-1.03x there, as noisy, so
// nothing to gain. Figures in the README (issue #14, bench/results/t1-ab-*).
inline int64_t prefetch_bands(int passes) { return passes > 1 ? 2 : 1; }

}  // namespace
