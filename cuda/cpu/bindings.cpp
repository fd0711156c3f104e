// Torch bindings of the CPU rasterizer: argument checks, allocation, dtype dispatch.
// The Python side (recon/raster/cpu_backend.py) wraps these in autograd Functions.
#include <torch/extension.h>

#include <tuple>

#include "hash_ops.h"
#include "ops.h"
#include "raster_ops.h"

namespace {

void check(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

int threads() { return at::get_num_threads(); }

template <typename T> T* opt_ptr(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
project_forward(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
                const torch::Tensor& opacities, const torch::Tensor& viewmats, const torch::Tensor& Ks,
                int64_t width, int64_t height, double eps2d, double near_plane, double far_plane,
                bool antialiased) {
  const auto dt = means.scalar_type();
  for (auto [t, n] : {std::pair{&means, "means"}, {&quats, "quats"}, {&scales, "scales"},
                      {&opacities, "opacities"}, {&viewmats, "viewmats"}, {&Ks, "Ks"}})
    check(*t, n, dt);
  const int64_t N = means.size(0), C = viewmats.size(0);
  auto opts = means.options();
  auto radii = torch::empty({C, N, 2}, opts.dtype(torch::kInt32));
  auto means2d = torch::empty({C, N, 2}, opts);
  auto depths = torch::empty({C, N}, opts);
  auto conics = torch::empty({C, N, 3}, opts);
  auto comps = torch::empty({C, N}, opts);
  AT_DISPATCH_FLOATING_TYPES(dt, "project_forward", [&] {
    splat_cpu::project_forward<scalar_t>(
        C, N, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
        opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(),
        width, height, eps2d, near_plane, far_plane, antialiased, radii.data_ptr<int32_t>(),
        means2d.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(),
        comps.data_ptr<scalar_t>(), threads());
  });
  return {radii, means2d, depths, conics, comps};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>>
project_backward(const torch::Tensor& means, const torch::Tensor& quats, const torch::Tensor& scales,
                 const torch::Tensor& viewmats, const torch::Tensor& Ks, int64_t width, int64_t height,
                 double eps2d, const torch::Tensor& radii, const torch::Tensor& conics,
                 const torch::Tensor& comps, const torch::Tensor& v_means2d,
                 const torch::Tensor& v_depths, const torch::Tensor& v_conics,
                 const c10::optional<torch::Tensor>& v_comps, bool viewmats_grad) {
  const auto dt = means.scalar_type();
  for (auto [t, n] : {std::pair{&means, "means"}, {&quats, "quats"}, {&scales, "scales"},
                      {&viewmats, "viewmats"}, {&Ks, "Ks"}, {&conics, "conics"}, {&comps, "comps"},
                      {&v_means2d, "v_means2d"}, {&v_depths, "v_depths"}, {&v_conics, "v_conics"}})
    check(*t, n, dt);
  check(radii, "radii", torch::kInt32);
  if (v_comps.has_value()) check(*v_comps, "v_compensations", dt);
  const int64_t N = means.size(0), C = viewmats.size(0);
  auto v_means = torch::empty_like(means);
  auto v_quats = torch::empty_like(quats);
  auto v_scales = torch::empty_like(scales);
  c10::optional<torch::Tensor> v_viewmats;
  if (viewmats_grad) v_viewmats = torch::zeros_like(viewmats);
  AT_DISPATCH_FLOATING_TYPES(dt, "project_backward", [&] {
    splat_cpu::project_backward<scalar_t>(
        C, N, means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
        viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), width, height, eps2d,
        radii.data_ptr<int32_t>(), conics.data_ptr<scalar_t>(), comps.data_ptr<scalar_t>(),
        v_means2d.data_ptr<scalar_t>(), v_depths.data_ptr<scalar_t>(), v_conics.data_ptr<scalar_t>(),
        opt_ptr<scalar_t>(v_comps), v_means.data_ptr<scalar_t>(), v_quats.data_ptr<scalar_t>(),
        v_scales.data_ptr<scalar_t>(), opt_ptr<scalar_t>(v_viewmats), threads());
  });
  return {v_means, v_quats, v_scales, v_viewmats};
}

torch::Tensor sh_forward(int64_t degree, const torch::Tensor& dirs, const torch::Tensor& coeffs) {
  check(dirs, "dirs", dirs.scalar_type());
  check(coeffs, "coeffs", dirs.scalar_type());
  TORCH_CHECK(degree >= 0 && degree <= 3, "sh degree must be in [0, 3], got ", degree);
  const int64_t C = dirs.size(0), N = dirs.size(1), K = coeffs.size(1);
  TORCH_CHECK(K >= (degree + 1) * (degree + 1), "need ", (degree + 1) * (degree + 1), " SH coefficients, got ", K);
  auto colors = torch::empty({C, N, 3}, dirs.options());
  AT_DISPATCH_FLOATING_TYPES(dirs.scalar_type(), "sh_forward", [&] {
    splat_cpu::sh_forward<scalar_t>(C, N, K, static_cast<int>(degree), dirs.data_ptr<scalar_t>(),
                                    coeffs.data_ptr<scalar_t>(), colors.data_ptr<scalar_t>(), threads());
  });
  return colors;
}

std::tuple<c10::optional<torch::Tensor>, torch::Tensor> sh_backward(
    int64_t degree, const torch::Tensor& dirs, const torch::Tensor& coeffs,
    const torch::Tensor& v_colors, bool dirs_grad) {
  const auto dt = dirs.scalar_type();
  check(dirs, "dirs", dt);
  check(coeffs, "coeffs", dt);
  check(v_colors, "v_colors", dt);
  const int64_t C = dirs.size(0), N = dirs.size(1), K = coeffs.size(1);
  c10::optional<torch::Tensor> v_dirs;
  if (dirs_grad) v_dirs = torch::empty_like(dirs);
  auto v_coeffs = torch::empty_like(coeffs);
  AT_DISPATCH_FLOATING_TYPES(dt, "sh_backward", [&] {
    splat_cpu::sh_backward<scalar_t>(C, N, K, static_cast<int>(degree), dirs.data_ptr<scalar_t>(),
                                     coeffs.data_ptr<scalar_t>(), v_colors.data_ptr<scalar_t>(),
                                     opt_ptr<scalar_t>(v_dirs), v_coeffs.data_ptr<scalar_t>(), threads());
  });
  return {v_dirs, v_coeffs};
}

std::tuple<torch::Tensor, torch::Tensor> isect_tiles(const torch::Tensor& means2d, const torch::Tensor& radii,
                                                     const torch::Tensor& depths, int64_t tile_size,
                                                     int64_t tiles_x, int64_t tiles_y) {
  const auto dt = means2d.scalar_type();
  check(means2d, "means2d", dt);
  check(depths, "depths", dt);
  check(radii, "radii", torch::kInt32);
  const int64_t C = means2d.size(0), N = means2d.size(1);
  std::vector<int64_t> offsets, ids;
  AT_DISPATCH_FLOATING_TYPES(dt, "isect_tiles", [&] {
    splat_cpu::isect_tiles<scalar_t>(C, N, means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(),
                                     depths.data_ptr<scalar_t>(), tile_size, tiles_x, tiles_y, offsets,
                                     ids, threads());
  });
  auto opts = torch::TensorOptions().dtype(torch::kInt64);
  auto t_offsets = torch::from_blob(offsets.data(), {C, tiles_y, tiles_x}, opts).clone();
  auto t_ids = torch::from_blob(ids.data(), {static_cast<int64_t>(ids.size())}, opts).clone();
  return {t_offsets, t_ids};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> rasterize_forward(
    const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& features,
    const torch::Tensor& opacities, const c10::optional<torch::Tensor>& backgrounds, int64_t width,
    int64_t height, int64_t tile_size, const torch::Tensor& tile_offsets, const torch::Tensor& flat_ids) {
  const auto dt = means2d.scalar_type();
  for (auto [t, n] : {std::pair{&means2d, "means2d"}, {&conics, "conics"}, {&features, "features"},
                      {&opacities, "opacities"}})
    check(*t, n, dt);
  if (backgrounds.has_value()) check(*backgrounds, "backgrounds", dt);
  check(tile_offsets, "tile_offsets", torch::kInt64);
  check(flat_ids, "flat_ids", torch::kInt64);
  const int64_t C = means2d.size(0), N = means2d.size(1), D = features.size(2);
  const int64_t tiles_y = tile_offsets.size(1), tiles_x = tile_offsets.size(2);
  auto opts = means2d.options();
  auto render = torch::empty({C, height, width, D}, opts);
  auto alpha = torch::empty({C, height, width, 1}, opts);
  auto final_T = torch::empty({C, height, width}, opts);
  auto last_ids = torch::empty({C, height, width}, opts.dtype(torch::kInt32));
  AT_DISPATCH_FLOATING_TYPES(dt, "rasterize_forward", [&] {
    splat_cpu::rasterize_forward<scalar_t>(
        C, N, D, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(),
        opacities.data_ptr<scalar_t>(), opt_ptr<scalar_t>(backgrounds), width, height, tile_size,
        tiles_x, tiles_y, tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int64_t>(),
        flat_ids.numel(), render.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        final_T.data_ptr<scalar_t>(), last_ids.data_ptr<int32_t>(), threads());
  });
  return {render, alpha, final_T, last_ids};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>>
rasterize_backward(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& features,
                   const torch::Tensor& opacities, const c10::optional<torch::Tensor>& backgrounds,
                   int64_t width, int64_t height, int64_t tile_size, const torch::Tensor& tile_offsets,
                   const torch::Tensor& flat_ids, const torch::Tensor& final_T,
                   const torch::Tensor& last_ids, const torch::Tensor& v_render,
                   const torch::Tensor& v_alpha) {
  const auto dt = means2d.scalar_type();
  for (auto [t, n] : {std::pair{&means2d, "means2d"}, {&conics, "conics"}, {&features, "features"},
                      {&opacities, "opacities"}, {&final_T, "final_T"}, {&v_render, "v_render"},
                      {&v_alpha, "v_alpha"}})
    check(*t, n, dt);
  check(last_ids, "last_ids", torch::kInt32);
  const int64_t C = means2d.size(0), N = means2d.size(1), D = features.size(2);
  const int64_t tiles_y = tile_offsets.size(1), tiles_x = tile_offsets.size(2);
  auto v_means2d = torch::zeros_like(means2d);
  auto v_conics = torch::zeros_like(conics);
  auto v_features = torch::zeros_like(features);
  auto v_opacities = torch::zeros_like(opacities);
  c10::optional<torch::Tensor> v_backgrounds;
  if (backgrounds.has_value()) v_backgrounds = torch::zeros_like(*backgrounds);
  AT_DISPATCH_FLOATING_TYPES(dt, "rasterize_backward", [&] {
    splat_cpu::rasterize_backward<scalar_t>(
        C, N, D, means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(),
        opacities.data_ptr<scalar_t>(), opt_ptr<scalar_t>(backgrounds), width, height, tile_size,
        tiles_x, tiles_y, tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int64_t>(),
        flat_ids.numel(), final_T.data_ptr<scalar_t>(), last_ids.data_ptr<int32_t>(),
        v_render.data_ptr<scalar_t>(), v_alpha.data_ptr<scalar_t>(), v_means2d.data_ptr<scalar_t>(),
        v_conics.data_ptr<scalar_t>(), v_features.data_ptr<scalar_t>(), v_opacities.data_ptr<scalar_t>(),
        opt_ptr<scalar_t>(v_backgrounds), threads());
  });
  return {v_means2d, v_conics, v_features, v_opacities, v_backgrounds};
}

void check_hash_args(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales,
                     const torch::Tensor& res) {
  const auto dt = x.scalar_type();
  check(x, "x", dt);
  check(table, "table", dt);
  check(scales, "scales", dt);
  check(res, "res", torch::kInt32);
  check_hash_shapes(x, table, scales, res);
}

torch::Tensor hash_encode_forward(const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales,
                                  const torch::Tensor& res) {
  check_hash_args(x, table, scales, res);
  const int64_t N = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  auto out = torch::empty({N, L * F}, x.options());
  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_forward", [&] {
    ok = splat_cpu::hash_encode_forward<scalar_t>(N, int(x.size(1)), L, S, int(F), x.data_ptr<scalar_t>(),
                                                  table.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
                                                  res.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), threads());
  });
  TORCH_CHECK(ok, "hash encoding: D = ", x.size(1), ", F = ", F, " is not built (D 2 or 3, F 1, 2, 4 or 8)");
  return out;
}

std::tuple<torch::Tensor, c10::optional<torch::Tensor>> hash_encode_backward(
    const torch::Tensor& x, const torch::Tensor& table, const torch::Tensor& scales, const torch::Tensor& res,
    const torch::Tensor& v_out, bool x_grad) {
  check_hash_args(x, table, scales, res);
  check(v_out, "v_out", x.scalar_type());
  const int64_t N = x.size(0), L = table.size(0), S = table.size(1), F = table.size(2);
  TORCH_CHECK(v_out.dim() == 2 && v_out.size(0) == N && v_out.size(1) == L * F, "hash encoding: v_out must be [N, L*F]");
  auto v_table = torch::empty_like(table);
  c10::optional<torch::Tensor> v_x;
  if (x_grad) v_x = torch::empty_like(x);
  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hash_encode_backward", [&] {
    ok = splat_cpu::hash_encode_backward<scalar_t>(
        N, int(x.size(1)), L, S, int(F), x.data_ptr<scalar_t>(), table.data_ptr<scalar_t>(),
        scales.data_ptr<scalar_t>(), res.data_ptr<int32_t>(), v_out.data_ptr<scalar_t>(),
        v_table.data_ptr<scalar_t>(), x_grad ? v_x->data_ptr<scalar_t>() : nullptr, threads());
  });
  TORCH_CHECK(ok, "hash encoding: D = ", x.size(1), ", F = ", F, " is not built (D 2 or 3, F 1, 2, 4 or 8)");
  return {v_table, v_x};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "avatar-studio CPU kernels (OpenMP): Gaussian rasterizer, hash encoding";
  SPLAT_REGISTER_RASTER_OPS(m);
  HASH_REGISTER_OPS(m);
}
