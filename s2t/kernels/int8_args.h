// The arguments both int8 kernels take (int8_vnni.cpp, int8_amx.cpp): activations x [M, K] float32, weights
// u [N, Kp] uint8 (q + 128, rows zero-padded to Kp, a multiple of kBlock), scales [N] float32. Checked and
// prepared the same way, with the kernel's name in every message. Its hash is part of both kernels' build flags.
#pragma once

#include <torch/extension.h>

namespace {

// Checks the arguments, makes them contiguous in place and returns the output y [M, N] to fill.
inline torch::Tensor int8_linear_output(const char* kernel, torch::Tensor& x, torch::Tensor& u, torch::Tensor& scale,
                                        int64_t in_features, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && u.dim() == 2 && scale.dim() == 1, kernel, ": x [M, K], u [N, Kp], scale [N]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, kernel, ": x must be float32, got ", x.scalar_type());
  TORCH_CHECK(u.scalar_type() == torch::kUInt8, kernel, ": u must be uint8, got ", u.scalar_type());
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32, kernel, ": scale must be float32");
  const int64_t K = x.size(1), N = u.size(0), Kp = u.size(1);
  TORCH_CHECK(K == in_features && Kp % block == 0 && Kp >= K && Kp < K + block && scale.size(0) == N, kernel,
              ": shapes ", x.sizes(), " ", u.sizes(), " ", scale.sizes(), " do not match ", in_features, " inputs");
  x = x.contiguous();
  u = u.contiguous();
  scale = scale.contiguous();
  return torch::empty({x.size(0), N}, x.options());
}

}  // namespace
