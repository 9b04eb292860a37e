// AMX tile state shared by the kernels that use the tiles (int8_amx.cpp; bench/kernels/amx_b_layout.cpp): the
// tile configuration's memory layout (palette 1) and the permission Linux wants before a process may touch the
// tiles. Included by one translation unit each; its hash is part of their build flags, so an edit rebuilds them.
#pragma once

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); asked once
// per process.
inline bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  static const bool permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return permitted;
}

}  // namespace
