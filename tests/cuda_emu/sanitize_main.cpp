// A standalone run of the CUDA compositing kernels under cuda_emu, for ThreadSanitizer and
// AddressSanitizer + UBSan builds (tests/test_cuda_kernels.py builds and runs it).
// Usage: sanitize_main IN OUT. IN holds, little-endian: int64 C, N, D, width, height,
// tiles_x, tiles_y, n_isects, has_background; then float32 means2d [C,N,2], conics
// [C,N,3], features [C,N,D], opacities [C,N], backgrounds [C,D] (if any), v_render
// [C,H,W,D], v_alpha [C,H,W]; int64 tile_offsets [C*tiles_y*tiles_x], flat_ids [n_isects].
// OUT gets float32 render, alpha, final_T, then int32 last_ids, then float32 v_means2d,
// v_conics, v_features, v_opacities, v_backgrounds (if any).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "rasterize.h"

namespace {

template <class T> std::vector<T> read(std::FILE* f, int64_t n) {
  std::vector<T> v(size_t(n > 0 ? n : 0));
  if (n > 0 && std::fread(v.data(), sizeof(T), size_t(n), f) != size_t(n)) {
    std::fprintf(stderr, "sanitize_main: input ends early\n");
    std::exit(2);
  }
  return v;
}

template <class T> void write(std::FILE* f, const std::vector<T>& v) { std::fwrite(v.data(), sizeof(T), v.size(), f); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  const auto head = read<int64_t>(in, 9);
  const int64_t C = head[0], N = head[1], D = head[2], W = head[3], H = head[4], tx = head[5], ty = head[6],
                M = head[7];
  const bool has_bg = head[8] != 0;
  auto means2d = read<float>(in, C * N * 2), conics = read<float>(in, C * N * 3);
  auto features = read<float>(in, C * N * D), opacities = read<float>(in, C * N);
  auto backgrounds = read<float>(in, has_bg ? C * D : 0);
  auto v_render = read<float>(in, C * H * W * D), v_alpha = read<float>(in, C * H * W);
  auto offsets = read<int64_t>(in, C * ty * tx), ids = read<int64_t>(in, M);
  std::fclose(in);

  std::vector<float> render(C * H * W * D), alpha(C * H * W), final_T(C * H * W);
  std::vector<int32_t> last(C * H * W);
  const float* bg = has_bg ? backgrounds.data() : nullptr;
  if (splat_cuda::rasterize_forward(C, N, int(D), means2d.data(), conics.data(), features.data(), opacities.data(), bg,
                                    int(W), int(H), splat_cuda::kTileSize, int(tx), int(ty), offsets.data(), ids.data(),
                                    M, render.data(), alpha.data(), final_T.data(), last.data(), nullptr) != cudaSuccess)
    return 3;
  std::vector<float> v_means2d(means2d.size()), v_conics(conics.size()), v_features(features.size()),
      v_opacities(opacities.size()), v_backgrounds(backgrounds.size());
  if (splat_cuda::rasterize_backward(C, N, int(D), means2d.data(), conics.data(), features.data(), opacities.data(),
                                     bg, int(W), int(H), splat_cuda::kTileSize, int(tx), int(ty), offsets.data(),
                                     ids.data(), M, final_T.data(), last.data(), v_render.data(), v_alpha.data(),
                                     v_means2d.data(), v_conics.data(), v_features.data(), v_opacities.data(),
                                     has_bg ? v_backgrounds.data() : nullptr, nullptr) != cudaSuccess)
    return 3;

  std::FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  write(out, render), write(out, alpha), write(out, final_T), write(out, last);
  write(out, v_means2d), write(out, v_conics), write(out, v_features), write(out, v_opacities), write(out, v_backgrounds);
  std::fclose(out);
  return 0;
}
