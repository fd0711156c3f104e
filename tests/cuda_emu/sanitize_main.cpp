// A standalone run of the CUDA kernels under cuda_emu, for ThreadSanitizer and
// AddressSanitizer + UBSan builds (tests/test_cuda_kernels.py builds and runs it).
// Usage: sanitize_main MODE IN OUT, MODE one of raster, project, sh, tiles, hash. IN holds,
// little-endian, int64 sizes then float32 inputs (and, for raster, int64 tile lists); OUT
// gets the outputs in order, each float32 but the int32 radii and last_ids and the int64
// tile lists:
//   raster:  C N D width height tiles_x tiles_y n_isects has_background | means2d [C,N,2],
//            conics [C,N,3], features [C,N,D], opacities [C,N], backgrounds [C,D] (if any),
//            v_render [C,H,W,D], v_alpha [C,H,W] | tile_offsets [C*tiles_y*tiles_x],
//            flat_ids [n_isects]  ->  render, alpha, final_T, last_ids, v_means2d, v_conics,
//            v_features, v_opacities, v_backgrounds (if any)
//   project: C N width height antialiased | means [N,3], quats [N,4], scales [N,3],
//            opacities [N], viewmats [C,4,4], Ks [C,3,3], v_means2d [C,N,2], v_depths [C,N],
//            v_conics [C,N,3], v_compensations [C,N]  ->  radii, means2d, depths, conics,
//            compensations, v_means, v_quats, v_scales, v_viewmats
//   sh:      C N K degree | dirs [C,N,3], coeffs [N,K,3], v_colors [C,N,3]  ->  colors,
//            v_dirs, v_coeffs
//   tiles:   C N tiles_x tiles_y | means2d [C,N,2], radii [C,N,2] (whole numbers), depths [C,N]
//            ->  tile_offsets [C*tiles_y*tiles_x], flat_ids [n_isects] (16 x 16 tiles)
//   hash:    N D L S F | x [N,D], table [L,S,F], scales [L], res [L] (whole numbers),
//            v_out [N,L*F]  ->  out [N,L*F], v_table [L,S,F], v_x [N,D]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "hash_encoding.h"
#include "projection.h"
#include "rasterize.h"
#include "spherical_harmonics.h"
#include "tile_intersect.h"

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

void ok(cudaError_t status) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "sanitize_main: a kernel refused its arguments\n");
    std::exit(3);
  }
}

void raster(std::FILE* in, std::FILE* out) {
  const auto head = read<int64_t>(in, 9);
  const int64_t C = head[0], N = head[1], D = head[2], W = head[3], H = head[4], tx = head[5], ty = head[6],
                M = head[7];
  const bool has_bg = head[8] != 0;
  auto means2d = read<float>(in, C * N * 2), conics = read<float>(in, C * N * 3);
  auto features = read<float>(in, C * N * D), opacities = read<float>(in, C * N);
  auto backgrounds = read<float>(in, has_bg ? C * D : 0);
  auto v_render = read<float>(in, C * H * W * D), v_alpha = read<float>(in, C * H * W);
  auto offsets = read<int64_t>(in, C * ty * tx), ids = read<int64_t>(in, M);
  std::vector<float> render(C * H * W * D), alpha(C * H * W), final_T(C * H * W);
  std::vector<int32_t> last(C * H * W);
  const float* bg = has_bg ? backgrounds.data() : nullptr;
  ok(splat_cuda::rasterize_forward(C, N, int(D), means2d.data(), conics.data(), features.data(), opacities.data(), bg,
                                   int(W), int(H), splat_cuda::kTileSize, int(tx), int(ty), offsets.data(), ids.data(),
                                   M, render.data(), alpha.data(), final_T.data(), last.data(), nullptr));
  std::vector<float> v_means2d(means2d.size()), v_conics(conics.size()), v_features(features.size()),
      v_opacities(opacities.size()), v_backgrounds(backgrounds.size());
  ok(splat_cuda::rasterize_backward(C, N, int(D), means2d.data(), conics.data(), features.data(), opacities.data(), bg,
                                    int(W), int(H), splat_cuda::kTileSize, int(tx), int(ty), offsets.data(), ids.data(),
                                    M, final_T.data(), last.data(), v_render.data(), v_alpha.data(), v_means2d.data(),
                                    v_conics.data(), v_features.data(), v_opacities.data(),
                                    has_bg ? v_backgrounds.data() : nullptr, nullptr));
  write(out, render), write(out, alpha), write(out, final_T), write(out, last);
  write(out, v_means2d), write(out, v_conics), write(out, v_features), write(out, v_opacities), write(out, v_backgrounds);
}

void project(std::FILE* in, std::FILE* out) {
  const auto head = read<int64_t>(in, 5);
  const int64_t C = head[0], N = head[1], W = head[2], H = head[3];
  const bool antialiased = head[4] != 0;
  auto means = read<float>(in, N * 3), quats = read<float>(in, N * 4), scales = read<float>(in, N * 3);
  auto opacities = read<float>(in, N), viewmats = read<float>(in, C * 16), Ks = read<float>(in, C * 9);
  auto v_means2d = read<float>(in, C * N * 2), v_depths = read<float>(in, C * N);
  auto v_conics = read<float>(in, C * N * 3), v_comps = read<float>(in, C * N);
  std::vector<int32_t> radii(C * N * 2);
  std::vector<float> means2d(C * N * 2), depths(C * N), conics(C * N * 3), comps(C * N);
  ok(splat_cuda::project_forward(C, N, means.data(), quats.data(), scales.data(), opacities.data(), viewmats.data(),
                                 Ks.data(), int(W), int(H), 0.3f, 0.01f, 1e10f, antialiased, radii.data(),
                                 means2d.data(), depths.data(), conics.data(), comps.data(), nullptr));
  std::vector<float> v_means(means.size()), v_quats(quats.size()), v_scales(scales.size()), v_viewmats(C * 16);
  ok(splat_cuda::project_backward(C, N, means.data(), quats.data(), scales.data(), viewmats.data(), Ks.data(), int(W),
                                  int(H), 0.3f, radii.data(), conics.data(), comps.data(), v_means2d.data(),
                                  v_depths.data(), v_conics.data(), antialiased ? v_comps.data() : nullptr,
                                  v_means.data(), v_quats.data(), v_scales.data(), v_viewmats.data(), nullptr));
  write(out, radii), write(out, means2d), write(out, depths), write(out, conics), write(out, comps);
  write(out, v_means), write(out, v_quats), write(out, v_scales), write(out, v_viewmats);
}

void sh(std::FILE* in, std::FILE* out) {
  const auto head = read<int64_t>(in, 4);
  const int64_t C = head[0], N = head[1], K = head[2], degree = head[3];
  auto dirs = read<float>(in, C * N * 3), coeffs = read<float>(in, N * K * 3), v_colors = read<float>(in, C * N * 3);
  std::vector<float> colors(C * N * 3), v_dirs(C * N * 3), v_coeffs(N * K * 3);
  ok(splat_cuda::sh_forward(C, N, K, int(degree), dirs.data(), coeffs.data(), colors.data(), nullptr));
  ok(splat_cuda::sh_backward(C, N, K, int(degree), dirs.data(), coeffs.data(), v_colors.data(), v_dirs.data(),
                             v_coeffs.data(), nullptr));
  write(out, colors), write(out, v_dirs), write(out, v_coeffs);
}

void tiles(std::FILE* in, std::FILE* out) {
  const auto head = read<int64_t>(in, 4);
  const int64_t C = head[0], N = head[1], tx = head[2], ty = head[3];
  auto means2d = read<float>(in, C * N * 2), radii_f = read<float>(in, C * N * 2), depths = read<float>(in, C * N);
  const std::vector<int32_t> radii(radii_f.begin(), radii_f.end());
  std::vector<int64_t> counts(C * N), cumsum(C * N);
  std::vector<char> temp(splat_cuda::isect_count_temp_bytes(C, N));
  ok(splat_cuda::isect_count(C, N, means2d.data(), radii.data(), splat_cuda::kTileSize, int(tx), int(ty),
                             counts.data(), cumsum.data(), temp.data(), temp.size(), nullptr));
  const int64_t M = C * N ? cumsum.back() : 0;
  std::vector<uint64_t> keys(2 * M);
  std::vector<int64_t> ids(M), flat_ids(M), offsets(C * ty * tx);
  temp.assign(splat_cuda::isect_sort_temp_bytes(C, int(tx), int(ty), M), 0);
  ok(splat_cuda::isect_sort(C, N, means2d.data(), radii.data(), depths.data(), splat_cuda::kTileSize, int(tx), int(ty),
                            cumsum.data(), M, keys.data(), ids.data(), temp.data(), temp.size(), offsets.data(),
                            flat_ids.data(), nullptr));
  write(out, offsets), write(out, flat_ids);
}

void hash(std::FILE* in, std::FILE* out) {
  const auto head = read<int64_t>(in, 5);
  const int64_t N = head[0], D = head[1], L = head[2], S = head[3], F = head[4];
  auto x = read<float>(in, N * D), table = read<float>(in, L * S * F), scales = read<float>(in, L);
  auto res_f = read<float>(in, L), v_out = read<float>(in, N * L * F);
  const std::vector<int32_t> res(res_f.begin(), res_f.end());
  std::vector<float> encoded(N * L * F), v_table(L * S * F, 0.f), v_x(N * D);
  ok(splat_cuda::hash_encode_forward(N, int(D), L, S, int(F), x.data(), table.data(), scales.data(), res.data(),
                                     encoded.data(), nullptr));
  ok(splat_cuda::hash_encode_backward(N, int(D), L, S, int(F), x.data(), table.data(), scales.data(), res.data(),
                                      v_out.data(), v_table.data(), v_x.data(), nullptr));
  write(out, encoded), write(out, v_table), write(out, v_x);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s raster|project|sh|tiles|hash IN OUT\n", argv[0]);
    return 2;
  }
  std::FILE* in = std::fopen(argv[2], "rb");
  std::FILE* out = std::fopen(argv[3], "wb");
  if (!in || !out) return 2;
  if (!std::strcmp(argv[1], "raster")) raster(in, out);
  else if (!std::strcmp(argv[1], "project")) project(in, out);
  else if (!std::strcmp(argv[1], "sh")) sh(in, out);
  else if (!std::strcmp(argv[1], "tiles")) tiles(in, out);
  else if (!std::strcmp(argv[1], "hash")) hash(in, out);
  else return 2;
  std::fclose(in);
  std::fclose(out);
  return 0;
}
