// The torch op of the CUDA kernels (cuda/kernels/*.cu): the functions of the CPU
// extension (cuda/cpu/bindings.cpp), same names, arguments and outputs, float32 only, so
// recon/raster/kernels_backend.py runs either. recon/raster/_build.py builds it with nvcc on
// CUDA machines. The tests build the same file for the CPU against the emulation headers
// of tests/cuda_emu (CUDA_EMU defined), where tensors are CPU tensors and launches run
// synchronously.
#include <torch/extension.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "hash_encoding.h"
#include "hash_ops.h"
#include "projection.h"
#include "raster_ops.h"
#include "rasterize.h"
#include "spherical_harmonics.h"
#include "tile_intersect.h"

#ifndef CUDA_EMU
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

#ifdef CUDA_EMU
constexpr auto kDevice = torch::kCPU;
cudaStream_t stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const torch::Tensor&) {}
};
#else
constexpr auto kDevice = torch::kCUDA;
cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }
struct DeviceGuard {  // launches on the inputs' GPU
  explicit DeviceGuard(const torch::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
#endif

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.device().type() == kDevice && t.is_contiguous() && t.scalar_type() == dtype, name,
              " must be a contiguous ", kDevice, " tensor of ", dtype);
}

void ok(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, what, ": ",
              status == cudaErrorInvalidValue
                  ? "the kernels are not built for these arguments (channels, tile size, SH degree, hash-grid dims or features)"
                  : cudaGetErrorString(status));
}

const float* opt(const c10::optional<torch::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> project_forward(
    const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
    const torch::Tensor& opacities, const torch::Tensor& viewmats, const torch::Tensor& Ks, int64_t width,
    int64_t height, double eps2d, double near_plane, double far_plane, bool antialiased) {
  for (auto [t, n] : {std::pair{&means, "means"}, {&quats, "quats"}, {&scales, "scales"}, {&opacities, "opacities"},
                      {&viewmats, "viewmats"}, {&Ks, "Ks"}})
    check(*t, n, torch::kFloat32);
  const DeviceGuard guard(means);
  const int64_t N = means.size(0), C = viewmats.size(0);
  auto opts = means.options();
  auto radii = torch::empty({C, N, 2}, opts.dtype(torch::kInt32));
  auto means2d = torch::empty({C, N, 2}, opts), depths = torch::empty({C, N}, opts);
  auto conics = torch::empty({C, N, 3}, opts), comps = torch::empty({C, N}, opts);
  ok(splat_cuda::project_forward(C, N, means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(),
                                 opacities.data_ptr<float>(), viewmats.data_ptr<float>(), Ks.data_ptr<float>(),
                                 int(width), int(height), float(eps2d), float(near_plane), float(far_plane),
                                 antialiased, radii.data_ptr<int32_t>(), means2d.data_ptr<float>(),
                                 depths.data_ptr<float>(), conics.data_ptr<float>(), comps.data_ptr<float>(), stream()),
     "project_forward");
  return {radii, means2d, depths, conics, comps};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>> project_backward(
    const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
    const torch::Tensor& viewmats, const torch::Tensor& Ks, int64_t width, int64_t height, double eps2d,
    const torch::Tensor& radii, const torch::Tensor& conics, const torch::Tensor& comps,
    const torch::Tensor& v_means2d, const torch::Tensor& v_depths, const torch::Tensor& v_conics,
    const c10::optional<torch::Tensor>& v_comps, bool viewmats_grad) {
  for (auto [t, n] : {std::pair{&means, "means"}, {&quats, "quats"}, {&scales, "scales"}, {&viewmats, "viewmats"},
                      {&Ks, "Ks"}, {&conics, "conics"}, {&comps, "comps"}, {&v_means2d, "v_means2d"},
                      {&v_depths, "v_depths"}, {&v_conics, "v_conics"}})
    check(*t, n, torch::kFloat32);
  check(radii, "radii", torch::kInt32);
  if (v_comps.has_value()) check(*v_comps, "v_compensations", torch::kFloat32);
  const DeviceGuard guard(means);
  auto v_means = torch::zeros_like(means), v_quats = torch::zeros_like(quats), v_scales = torch::zeros_like(scales);
  c10::optional<torch::Tensor> v_viewmats;
  if (viewmats_grad) v_viewmats = torch::zeros_like(viewmats);
  ok(splat_cuda::project_backward(
         viewmats.size(0), means.size(0), means.data_ptr<float>(), quats.data_ptr<float>(),
         scales.data_ptr<float>(), viewmats.data_ptr<float>(), Ks.data_ptr<float>(), int(width), int(height),
         float(eps2d), radii.data_ptr<int32_t>(), conics.data_ptr<float>(), comps.data_ptr<float>(),
         v_means2d.data_ptr<float>(), v_depths.data_ptr<float>(), v_conics.data_ptr<float>(), opt(v_comps),
         v_means.data_ptr<float>(), v_quats.data_ptr<float>(), v_scales.data_ptr<float>(),
         viewmats_grad ? v_viewmats->data_ptr<float>() : nullptr, stream()),
     "project_backward");
  return {v_means, v_quats, v_scales, v_viewmats};
}

torch::Tensor sh_forward(int64_t degree, const torch::Tensor& dirs, const torch::Tensor& coeffs) {
  check(dirs, "dirs", torch::kFloat32);
  check(coeffs, "coeffs", torch::kFloat32);
  const DeviceGuard guard(dirs);
  const int64_t C = dirs.size(0), N = dirs.size(1);
  auto colors = torch::empty({C, N, 3}, dirs.options());
  ok(splat_cuda::sh_forward(C, N, coeffs.size(1), int(degree), dirs.data_ptr<float>(), coeffs.data_ptr<float>(),
                            colors.data_ptr<float>(), stream()),
     "sh_forward");
  return colors;
}

std::tuple<c10::optional<torch::Tensor>, torch::Tensor> sh_backward(int64_t degree, const torch::Tensor& dirs,
                                                                    const torch::Tensor& coeffs,
                                                                    const torch::Tensor& v_colors, bool dirs_grad) {
  for (auto [t, n] : {std::pair{&dirs, "dirs"}, {&coeffs, "coeffs"}, {&v_colors, "v_colors"}})
    check(*t, n, torch::kFloat32);
  const DeviceGuard guard(dirs);
  c10::optional<torch::Tensor> v_dirs;
  if (dirs_grad) v_dirs = torch::empty_like(dirs);
  auto v_coeffs = torch::zeros_like(coeffs);
  ok(splat_cuda::sh_backward(dirs.size(0), dirs.size(1), coeffs.size(1), int(degree), dirs.data_ptr<float>(),
                             coeffs.data_ptr<float>(), v_colors.data_ptr<float>(),
                             dirs_grad ? v_dirs->data_ptr<float>() : nullptr, v_coeffs.data_ptr<float>(), stream()),
     "sh_backward");
  return {v_dirs, v_coeffs};
}

std::tuple<torch::Tensor, torch::Tensor> isect_tiles(const torch::Tensor& means2d, const torch::Tensor& radii,
                                                     const torch::Tensor& depths, int64_t tile_size, int64_t tiles_x,
                                                     int64_t tiles_y) {
  check(means2d, "means2d", torch::kFloat32);
  check(depths, "depths", torch::kFloat32);
  check(radii, "radii", torch::kInt32);
  const DeviceGuard guard(means2d);
  const int64_t C = means2d.size(0), N = means2d.size(1);
  const auto ints = means2d.options().dtype(torch::kInt64);
  const auto scratch = [&](size_t bytes) { return torch::empty({int64_t(bytes)}, ints.dtype(torch::kUInt8)); };
  auto tiles = torch::empty({C * N}, ints), tiles_cumsum = torch::empty({C * N}, ints);
  auto temp = scratch(splat_cuda::isect_count_temp_bytes(C, N));
  ok(splat_cuda::isect_count(C, N, means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), int(tile_size),
                             int(tiles_x), int(tiles_y), tiles.data_ptr<int64_t>(), tiles_cumsum.data_ptr<int64_t>(),
                             temp.data_ptr(), size_t(temp.numel()), stream()),
     "isect_tiles");
  // The one value the host needs: how many entries to allocate (a sync on a GPU).
  const int64_t n_isects = C * N > 0 ? tiles_cumsum[C * N - 1].item<int64_t>() : 0;
  auto keys = torch::empty({2 * n_isects}, ints);  // uint64 keys: unsorted, then sorted
  auto ids = torch::empty({n_isects}, ints), flat_ids = torch::empty({n_isects}, ints);
  auto tile_offsets = torch::empty({C, tiles_y, tiles_x}, ints);
  temp = scratch(splat_cuda::isect_sort_temp_bytes(C, int(tiles_x), int(tiles_y), n_isects));
  ok(splat_cuda::isect_sort(C, N, means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), depths.data_ptr<float>(),
                            int(tile_size), int(tiles_x), int(tiles_y), tiles_cumsum.data_ptr<int64_t>(), n_isects,
                            reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), ids.data_ptr<int64_t>(),
                            temp.data_ptr(), size_t(temp.numel()), tile_offsets.data_ptr<int64_t>(),
                            flat_ids.data_ptr<int64_t>(), stream()),
     "isect_tiles");
  return {tile_offsets, flat_ids};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> rasterize_forward(
    const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& features,
    const torch::Tensor& opacities, const c10::optional<torch::Tensor>& backgrounds, int64_t width,
    int64_t height, int64_t tile_size, const torch::Tensor& tile_offsets, const torch::Tensor& flat_ids) {
  for (auto [t, n] : {std::pair{&means2d, "means2d"}, {&conics, "conics"}, {&features, "features"},
                      {&opacities, "opacities"}})
    check(*t, n, torch::kFloat32);
  if (backgrounds.has_value()) check(*backgrounds, "backgrounds", torch::kFloat32);
  check(tile_offsets, "tile_offsets", torch::kInt64);
  check(flat_ids, "flat_ids", torch::kInt64);
  const DeviceGuard guard(means2d);
  const int64_t C = means2d.size(0), N = means2d.size(1), D = features.size(2);
  auto opts = means2d.options();
  auto render = torch::empty({C, height, width, D}, opts);
  auto alpha = torch::empty({C, height, width, 1}, opts);
  auto final_T = torch::empty({C, height, width}, opts);
  auto last_ids = torch::empty({C, height, width}, opts.dtype(torch::kInt32));
  ok(splat_cuda::rasterize_forward(C, N, int(D), means2d.data_ptr<float>(), conics.data_ptr<float>(),
                                   features.data_ptr<float>(), opacities.data_ptr<float>(), opt(backgrounds),
                                   int(width), int(height), int(tile_size), int(tile_offsets.size(2)),
                                   int(tile_offsets.size(1)), tile_offsets.data_ptr<int64_t>(),
                                   flat_ids.data_ptr<int64_t>(), flat_ids.numel(), render.data_ptr<float>(),
                                   alpha.data_ptr<float>(), final_T.data_ptr<float>(), last_ids.data_ptr<int32_t>(),
                                   stream()),
     "rasterize_forward");
  return {render, alpha, final_T, last_ids};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>>
rasterize_backward(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& features,
                   const torch::Tensor& opacities, const c10::optional<torch::Tensor>& backgrounds, int64_t width,
                   int64_t height, int64_t tile_size, const torch::Tensor& tile_offsets, const torch::Tensor& flat_ids,
                   const torch::Tensor& final_T, const torch::Tensor& last_ids, const torch::Tensor& v_render,
                   const torch::Tensor& v_alpha) {
  for (auto [t, n] : {std::pair{&means2d, "means2d"}, {&conics, "conics"}, {&features, "features"},
                      {&opacities, "opacities"}, {&final_T, "final_T"}, {&v_render, "v_render"},
                      {&v_alpha, "v_alpha"}})
    check(*t, n, torch::kFloat32);
  check(last_ids, "last_ids", torch::kInt32);
  const DeviceGuard guard(means2d);
  const int64_t C = means2d.size(0), N = means2d.size(1), D = features.size(2);
  auto v_means2d = torch::zeros_like(means2d), v_conics = torch::zeros_like(conics);
  auto v_features = torch::zeros_like(features), v_opacities = torch::zeros_like(opacities);
  c10::optional<torch::Tensor> v_backgrounds;
  if (backgrounds.has_value()) v_backgrounds = torch::zeros_like(*backgrounds);
  ok(splat_cuda::rasterize_backward(
         C, N, int(D), means2d.data_ptr<float>(), conics.data_ptr<float>(), features.data_ptr<float>(),
         opacities.data_ptr<float>(), opt(backgrounds), int(width), int(height), int(tile_size),
         int(tile_offsets.size(2)), int(tile_offsets.size(1)), tile_offsets.data_ptr<int64_t>(),
         flat_ids.data_ptr<int64_t>(), flat_ids.numel(), final_T.data_ptr<float>(), last_ids.data_ptr<int32_t>(),
         v_render.data_ptr<float>(), v_alpha.data_ptr<float>(), v_means2d.data_ptr<float>(),
         v_conics.data_ptr<float>(), v_features.data_ptr<float>(), v_opacities.data_ptr<float>(),
         v_backgrounds.has_value() ? v_backgrounds->data_ptr<float>() : nullptr, stream()),
     "rasterize_backward");
  return {v_means2d, v_conics, v_features, v_opacities, v_backgrounds};
}

void check_hash_args(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales,
                     const torch::Tensor& res) {
  for (auto [t, n] : {std::pair{&x, "x"}, {&table, "table"}, {&scales, "scales"}}) check(*t, n, torch::kFloat32);
  check(res, "res", torch::kInt32);
  check_hash_shapes(x, table, scales, res);
}

torch::Tensor hash_encode_forward(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales,
                                  const torch::Tensor& res) {
  check_hash_args(x, table, scales, res);
  const DeviceGuard guard(x);
  const int64_t N = x.size(0), L = table.size(0), F = table.size(2);
  auto out = torch::empty({N, L * F}, x.options());
  ok(splat_cuda::hash_encode_forward(N, int(x.size(1)), L, table.size(1), int(F), x.data_ptr<float>(),
                                     table.data_ptr<float>(), scales.data_ptr<float>(), res.data_ptr<int32_t>(),
                                     out.data_ptr<float>(), stream()),
     "hash_encode_forward");
  return out;
}

std::tuple<torch::Tensor, c10::optional<torch::Tensor>> hash_encode_backward(
    const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales, const torch::Tensor& res,
    const torch::Tensor& v_out, bool x_grad) {
  check_hash_args(x, table, scales, res);
  check(v_out, "v_out", torch::kFloat32);
  const int64_t N = x.size(0), L = table.size(0), F = table.size(2);
  TORCH_CHECK(v_out.dim() == 2 && v_out.size(0) == N && v_out.size(1) == L * F, "hash encoding: v_out must be [N, L*F]");
  const DeviceGuard guard(x);
  auto v_table = torch::zeros_like(table);
  c10::optional<torch::Tensor> v_x;
  if (x_grad) v_x = torch::empty_like(x);
  ok(splat_cuda::hash_encode_backward(N, int(x.size(1)), L, table.size(1), int(F), x.data_ptr<float>(),
                                      table.data_ptr<float>(), scales.data_ptr<float>(), res.data_ptr<int32_t>(),
                                      v_out.data_ptr<float>(), v_table.data_ptr<float>(),
                                      x_grad ? v_x->data_ptr<float>() : nullptr, stream()),
     "hash_encode_backward");
  return {v_table, v_x};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avatar-studio CUDA kernels (cuda/kernels): Gaussian rasterizer, hash encoding";
  SPLAT_REGISTER_RASTER_OPS(m);
  HASH_REGISTER_OPS(m);
}
