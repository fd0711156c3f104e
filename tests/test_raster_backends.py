"""The C++ CPU backend against the torch reference: forward values, gradients of every
input, finite differences of the hand-written backward, edge cases and bad arguments."""

import warnings

import pytest
import torch
from torch.testing import assert_close

from _scenes import look_at_viewmat, random_scene
from bench.scenes import garden_scene, head_scene
from recon.raster import BackendUnavailable, RasterizerArgumentError, rasterize
from recon.raster import kernels_backend, reference

INPUTS = ("means", "quats", "scales", "opacities", "colors", "viewmats")


def render_with_grads(s, backend, backgrounds=None, antialiased=False, seed=0):
    """Render, backprop a random weighting of image, alpha and depth; return both."""
    params = {k: getattr(s, k).detach().clone().requires_grad_() for k in INPUTS}
    bg = None if backgrounds is None else backgrounds.clone().requires_grad_()
    out = rasterize(params["means"], params["quats"], params["scales"], params["opacities"], params["colors"],
                    params["viewmats"], s.Ks, s.width, s.height, sh_degree=s.sh_degree, backgrounds=bg,
                    antialiased=antialiased, backend=backend)
    assert out.backend == backend
    out.means2d.retain_grad()
    g = torch.Generator().manual_seed(seed)
    w = [torch.rand(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in (out.image, out.alpha, out.depth)]
    ((out.image * w[0]).sum() + (out.alpha * w[1]).sum() + 0.1 * (out.depth * w[2]).sum()).backward()
    grads = {k: v.grad for k, v in params.items()}
    if bg is not None:
        grads["backgrounds"] = bg.grad
    grads["means2d"] = out.means2d.grad
    return out, grads


def assert_agree(a, b, name, rtol, outlier_frac=2e-3, outlier_cap=0.05):
    """Tight agreement (atol and rtol relative to the largest |b|) for all but a few
    elements. Those few are pixels where the two backends' float rounding puts a
    Gaussian on different sides of a 3DGS threshold (alpha 1/255, transmittance 1e-4);
    they may differ by up to ``outlier_cap`` of the largest |b|."""
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(b.abs().max()), 1e-12)
    diff = (a - b).abs()
    bad = diff > rtol * scale + rtol * b.abs()
    assert bad.double().mean() <= outlier_frac, (
        f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (max diff {float(diff.max()):.3g}, scale {scale:.3g})"
    )
    assert float(diff.max()) <= outlier_cap * scale, f"{name}: max diff {float(diff.max()):.3g} (scale {scale:.3g})"


def assert_backends_agree(s, backgrounds=None, antialiased=False, grad_rtol=2e-3):
    ref, ref_g = render_with_grads(s, "torch", backgrounds, antialiased)
    cpu, cpu_g = render_with_grads(s, "cpu", backgrounds, antialiased)
    assert ref.visible.any()
    assert torch.equal(cpu.radii, ref.radii)
    for name in ("means2d", "depths", "conics"):
        # float32 epsilon of pixel coordinates up to ~1000
        assert_close(getattr(cpu, name), getattr(ref, name), rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for name in ("image", "alpha", "depth"):
        assert_agree(getattr(cpu, name), getattr(ref, name), name, rtol=1e-4)
    for name, b in ref_g.items():
        assert_agree(cpu_g[name], b, f"grad {name}", rtol=grad_rtol)


@pytest.mark.parametrize(
    "sh_degree,feat_dim,with_bg,antialiased,size",
    [
        (None, 3, False, False, (64, 48)),
        (None, 5, True, False, (70, 45)),  # width/height not multiples of 16, D != 3
        (0, 3, True, False, (64, 64)),
        (1, 3, False, True, (50, 33)),
        (3, 3, True, False, (96, 40)),
        (3, 3, True, True, (81, 57)),
    ],
)
def test_random_scenes_agree(sh_degree, feat_dim, with_bg, antialiased, size):
    s = random_scene(n=800, cameras=3, width=size[0], height=size[1], sh_degree=sh_degree, feat_dim=feat_dim, seed=3)
    bg = torch.linspace(0.1, 0.9, s.colors.shape[-1] if sh_degree is None else 3) if with_bg else None
    assert_backends_agree(s, bg, antialiased)


def test_thin_tilted_gaussians_agree():
    """Needles (100:1) at every angle, where a row's exact span is far narrower than the
    bounding box the C++ compositor starts from: its span must lose no pixel."""
    s = random_scene(n=600, cameras=2, width=80, height=64, feat_dim=3, seed=5)
    s.scales = torch.tensor([0.2, 0.002, 0.002]).expand(600, 3).contiguous()  # random quats tilt them
    assert_backends_agree(s)


def test_per_camera_features_agree():
    s = random_scene(n=500, cameras=2, feat_dim=4)
    s.colors = torch.rand(2, 500, 4)
    assert_backends_agree(s)


def test_head_scene_agrees():
    assert_backends_agree(head_scene(n=5000, size=128, cameras=2))


def test_garden_scene_agrees(garden_path):
    s = garden_scene(garden_path)
    s.colors = s.colors.contiguous()
    assert_backends_agree(s, backgrounds=torch.tensor([0.1, 0.2, 0.3]), grad_rtol=5e-3)


def test_tile_lists_identical():
    s = random_scene(n=2000, cameras=2, width=100, height=77)
    radii, m2, depths, _, _ = reference.project(s.means, s.quats, s.scales, s.opacities, s.viewmats, s.Ks, 100, 77)
    tx, ty = reference.tile_grid(100, 77, 16)
    off_ref, ids_ref = reference.isect_tiles(m2, radii, depths, 16, tx, ty)
    off_cpu, ids_cpu = kernels_backend.isect_tiles(m2, radii, depths, 16, tx, ty)
    assert ids_ref.numel() > 2000
    assert torch.equal(off_ref, off_cpu)
    assert torch.equal(ids_ref, ids_cpu)


def _tiny_double_scene(sh_degree, seed):
    s = random_scene(n=6, cameras=2, width=19, height=13, sh_degree=sh_degree, seed=seed,
                     scale_range=(0.15, 0.4), opacity_range=(0.3, 0.8)).to("cpu", torch.float64)
    s.means = s.means * 0.5
    return s


@pytest.mark.parametrize("sh_degree,antialiased,seed", [(None, False, 1), (3, False, 2), (1, True, 4), (2, False, 5)])
def test_cpu_backward_matches_finite_differences(sh_degree, antialiased, seed):
    """Finite-difference check of the hand-written C++ backward, in double precision."""
    torch.manual_seed(seed)  # fast_mode's random projections: the same check every run
    s = _tiny_double_scene(sh_degree, seed)
    bg = torch.tensor([0.3, 0.1, 0.7], dtype=torch.float64, requires_grad=True)
    inputs = [getattr(s, k).clone().requires_grad_() for k in INPUTS]

    def f(means, quats, scales, opacities, colors, viewmats, bg):
        out = rasterize(means, quats, scales, opacities, colors, viewmats, s.Ks, s.width, s.height,
                        sh_degree=sh_degree, backgrounds=bg, antialiased=antialiased, backend="cpu")
        return out.image, out.alpha, out.depth

    # nondet_tol: the backward adds a Gaussian's gradient from several tiles atomically, in
    # the order the threads finish them, so two backward passes differ by float rounding
    assert torch.autograd.gradcheck(f, (*inputs, bg), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True,
                                    nondet_tol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_scene(backend):
    s = random_scene(n=0, cameras=2)
    bg = torch.tensor([0.2, 0.4, 0.6])
    means = s.means.clone().requires_grad_()
    out = rasterize(means, s.quats, s.scales, s.opacities, s.colors, s.viewmats, s.Ks, 40, 30,
                    backgrounds=bg, backend=backend)
    assert out.image.shape == (2, 30, 40, 3)
    assert_close(out.image, bg.expand(2, 30, 40, 3))
    assert (out.alpha == 0).all() and (out.depth == 0).all()
    out.image.sum().backward()
    assert means.grad.shape == (0, 3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_culling(backend):
    """Behind the camera, beyond the image, zero opacity and degenerate Gaussians are
    culled (radii 0, no pixels, zero gradients); one ordinary Gaussian stays."""
    V = look_at_viewmat((0.0, 0.0, -3.0))[None]  # camera at z = -3 looking at the origin
    K = torch.tensor([[[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]]])
    means = torch.tensor([[0.0, 0, 0], [0, 0, -4.0], [0, 0, -2.999], [40.0, 0, 0], [0.1, 0.1, 0], [-0.1, 0, 0]])
    scales = torch.full((6, 3), 0.1)
    scales[5] = 0.0  # degenerate: zero covariance, and eps2d = 0 below leaves det = 0
    opacities = torch.tensor([0.8, 0.8, 0.8, 0.8, 0.0, 0.8])
    quats = torch.tensor([[1.0, 0, 0, 0]]).repeat(6, 1)
    colors = torch.rand(6, 3)
    params = [t.clone().requires_grad_() for t in (means, scales, opacities, colors)]
    out = rasterize(params[0], quats, params[1], params[2], params[3], V, K, 64, 48, eps2d=0.0, backend=backend)
    assert out.visible[0].tolist() == [True, False, False, False, False, False]
    assert torch.isfinite(out.image).all() and torch.isfinite(out.depth).all()
    assert 0.5 < out.alpha.max() < 0.99
    (out.image.sum() + out.depth.sum()).backward()
    for p in params:
        assert torch.isfinite(p.grad).all()
        assert (p.grad[1:] == 0).all()
    assert (params[0].grad[0] != 0).any()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_depth_is_expected_camera_z(backend):
    """A single opaque-ish Gaussian at camera z = 3 renders depth 3 wherever alpha > 0."""
    V = look_at_viewmat((0.0, 0.0, -3.0))[None]
    K = torch.tensor([[[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]])
    out = rasterize(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.2), torch.tensor([0.9]),
                    torch.ones(1, 3), V, K, 32, 32, backend=backend)
    covered = out.alpha[..., 0] > 0
    assert covered.sum() > 50
    # depth = sum(w z) / sum(w): float32 rounding where alpha is near 1/255
    assert_close(out.depth[..., 0][covered], torch.full((int(covered.sum()),), 3.0), rtol=2e-5, atol=0)


def _args(**over):
    s = random_scene(n=10, cameras=1)
    args = dict(means=s.means, quats=s.quats, scales=s.scales, opacities=s.opacities, colors=s.colors,
                viewmats=s.viewmats, Ks=s.Ks, width=s.width, height=s.height)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(means=torch.zeros(10, 2)), r"means must have shape \[N, 3\]"),
        (dict(quats=torch.zeros(9, 4)), r"quats must have shape \[N, 4\]"),
        (dict(viewmats=torch.eye(4)), r"viewmats must have shape \[C, 4, 4\]"),
        (dict(Ks=torch.eye(3)[None].repeat(2, 1, 1)), r"Ks must have shape \[C, 3, 3\]"),
        (dict(opacities=torch.full((10,), 2.0)), r"opacities must lie in \[0, 1\]"),
        (dict(scales=-torch.ones(10, 3)), r"scales must be non-negative"),
        (dict(means=torch.full((10, 3), float("nan"))), r"means contains NaN"),
        (dict(colors=torch.full((10, 3), float("inf"))), r"colors contains NaN or Inf"),
        (dict(quats=torch.zeros(10, 4, dtype=torch.float64)), r"quats has dtype torch.float64"),
        (dict(means=torch.zeros(10, 3, dtype=torch.int64)), r"means must be floating point"),
        (dict(colors=torch.zeros(7, 3)), r"colors must be features \[N, D\]"),
        (dict(width=0), r"width and height must be positive"),
        (dict(height=12.5), r"width and height must be positive"),
    ],
)
def test_bad_arguments_raise_clear_errors(over, match):
    with pytest.raises(RasterizerArgumentError, match=match):
        rasterize(**_args(**over))


def test_bad_sh_and_backend_arguments():
    a = _args()
    with pytest.raises(RasterizerArgumentError, match=r"sh_degree=2, colors must be SH coefficients"):
        rasterize(**a, sh_degree=2)
    with pytest.raises(RasterizerArgumentError, match="sh_degree must be in"):
        rasterize(**_args(colors=torch.zeros(10, 25, 3)), sh_degree=4)
    with pytest.raises(RasterizerArgumentError, match="backend must be one of"):
        rasterize(**a, backend="vulkan")
    with pytest.raises(RasterizerArgumentError, match="backgrounds must have shape"):
        rasterize(**a, backgrounds=torch.zeros(4))
    with pytest.raises(BackendUnavailable, match="backend 'cuda' runs our CUDA kernels, and this run is on cpu"):
        rasterize(**a, backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend 'gsplat' runs gsplat's CUDA kernels, and this run is on cpu"):
        rasterize(**a, backend="gsplat")


def test_auto_picks_cpu_backend_on_cpu():
    assert rasterize(**_args()).backend == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_torch_backend_runs_on_gpu():
    s = random_scene(n=500, cameras=2)
    cpu_out = rasterize(*s.tensors, s.width, s.height, backend="torch")
    gpu = s.to("cuda")
    gpu_out = rasterize(*gpu.tensors, gpu.width, gpu.height, backend="torch")
    assert_close(gpu_out.image.cpu(), cpu_out.image, atol=1e-4, rtol=1e-4)


def test_gsplat_backend_maps_gsplats_outputs_onto_ours(monkeypatch):
    """The glue of the gsplat backend, without a GPU: a stand-in keeping gsplat's contract
    (unpacked [C, N, ...] meta, "RGB+ED" = colours then expected depth, backgrounds [C, D]
    padded with a zero depth channel inside gsplat) built from our torch reference; the
    backend must hand back exactly what the reference gives."""
    from recon.raster import gsplat_backend

    def stand_in(means, quats, scales, opacities, colors, viewmats, Ks, width, height, *, near_plane, far_plane,
                 eps2d, sh_degree, packed, tile_size, backgrounds, render_mode, rasterize_mode):
        assert packed is False and render_mode == "RGB+ED" and rasterize_mode == "antialiased"
        assert backgrounds.shape == (viewmats.shape[0], 3)
        out = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, sh_degree=sh_degree,
                        backgrounds=backgrounds, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
                        antialiased=True, tile_size=tile_size, backend="torch")
        meta = {"means2d": out.means2d, "radii": out.radii, "depths": out.depths, "conics": out.conics}
        return torch.cat([out.image, out.depth], -1), out.alpha, meta

    monkeypatch.setattr(gsplat_backend, "load_gsplat", lambda: stand_in)
    s = random_scene(n=300, cameras=2, sh_degree=2)
    bg = torch.tensor([0.2, 0.5, 0.9])
    kw = dict(sh_degree=2, backgrounds=bg, near_plane=0.01, far_plane=1e10, eps2d=0.3, antialiased=True, tile_size=16)
    got = gsplat_backend.rasterize_gsplat(*s.tensors, s.width, s.height, **kw)
    want = rasterize(*s.tensors, s.width, s.height, backend="torch", **{k: v for k, v in kw.items()})
    assert got.backend == "gsplat"
    for name in ("image", "alpha", "depth", "means2d", "radii", "depths", "conics"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("sh_degree,antialiased", [(None, False), (3, False), (3, True)])
def test_gsplat_backend_agrees_with_the_reference_on_gpu(sh_degree, antialiased):
    """gsplat's CUDA kernels against our torch reference on the GPU: values and the
    gradients of every input (gsplat builds with fast math: looser tolerances)."""
    s = random_scene(n=400, cameras=2, sh_degree=sh_degree).to("cuda")
    ref, ref_g = render_with_grads(s, "torch", antialiased=antialiased)
    gs, gs_g = render_with_grads(s, "gsplat", antialiased=antialiased)
    assert ref.visible.any() and (gs.visible == ref.visible).float().mean() > 0.999
    for name in ("image", "alpha", "depth"):
        assert_agree(getattr(gs, name), getattr(ref, name), name, rtol=1e-3)
    for name, b in ref_g.items():
        assert_agree(gs_g[name], b, f"grad {name}", rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("sh_degree,antialiased,cameras", [(None, False, 1), (3, False, 3), (3, True, 2)])
def test_cuda_backend_agrees_with_the_cpu_kernels_and_gsplat_on_gpu(sh_degree, antialiased, cameras):
    """Our CUDA kernels on the GPU against the CPU kernels (the same math: tight) and
    gsplat's CUDA kernels (fast math: looser), values and the gradients of every input,
    batched cameras included."""
    s = random_scene(n=400, cameras=cameras, sh_degree=sh_degree)
    bg = torch.tensor([0.2, 0.5, 0.9])
    cpu, cpu_g = render_with_grads(s, "cpu", bg, antialiased)
    gpu = s.to("cuda")
    ours, ours_g = render_with_grads(gpu, "cuda", bg.cuda(), antialiased)
    assert cpu.visible.any() and torch.equal(ours.radii.cpu(), cpu.radii)
    for name in ("image", "alpha", "depth"):
        assert_agree(getattr(ours, name).cpu(), getattr(cpu, name), name, rtol=1e-4)
    try:
        gs, _ = render_with_grads(gpu, "gsplat", bg.cuda(), antialiased)
    except BackendUnavailable:  # gsplat not installed here: ours against the CPU kernels only
        gs = None
    for name in ("image", "alpha", "depth") if gs is not None else ():
        assert_agree(getattr(ours, name).cpu(), getattr(gs, name).cpu(), f"{name} vs gsplat", rtol=1e-3)
    for name, b in cpu_g.items():
        assert_agree(ours_g[name].cpu(), b, f"grad {name}", rtol=1e-3)


def test_auto_on_a_gpu_picks_our_cuda_kernels_then_gsplat_then_torch(monkeypatch):
    """Which backend runs on CUDA tensors (the pick only: no GPU is touched). Ours first
    for float32; where ours cannot be built, gsplat's, announced once with the reason."""
    from recon.raster import _build, api, gsplat_backend, kernels_backend

    cuda = torch.device("cuda")
    monkeypatch.setattr(api, "_fallbacks_announced", set())
    monkeypatch.setattr(_build, "load_cuda_extension", lambda retry=False: object())
    monkeypatch.setattr(gsplat_backend, "load_gsplat", lambda: object())
    assert api._pick_backend("auto", cuda) == ("cuda", kernels_backend)
    assert api._pick_backend("cuda", cuda)[0] == "cuda"
    # ours are built for float32, colour and 16-pixel tiles: more channels or other tiles
    # go to gsplat, float64 (which neither CUDA backend takes) to torch
    assert api._pick_backend("auto", cuda, torch.float32, 8)[0] == "gsplat"
    assert api._pick_backend("auto", cuda, torch.float32, 3, 8)[0] == "gsplat"
    assert api._pick_backend("auto", cuda, torch.float64)[0] == "torch"
    for args, said in [((torch.float64,), r"takes float32 tensors, got torch.float64 \(the torch backend"),
                       ((torch.float32, 8), r"composites up to 3 channels, got 8 \(backend gsplat or torch"),
                       ((torch.float32, 3, 8), r"uses 16x16 tiles, got tile_size=8 \(backend gsplat or torch")]:
        with pytest.raises(RasterizerArgumentError, match=f"backend 'cuda' {said}"):
            api._pick_backend("cuda", cuda, *args)
    with pytest.raises(RasterizerArgumentError, match="backend 'gsplat' takes float32 tensors"):
        api._pick_backend("gsplat", cuda, torch.float64)

    def cannot_build(retry=False):
        raise _build.KernelBuildError("could not build the CUDA rasterizer: nvcc not found")

    monkeypatch.setattr(_build, "load_cuda_extension", cannot_build)
    with pytest.warns(RuntimeWarning, match="nvcc not found\nFalling back to gsplat's CUDA kernels") as said:
        assert api.check_backend("auto", cuda) == "gsplat"
    assert said[0].filename == __file__  # attributed to the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert api._pick_backend("auto", cuda)[0] == "gsplat"
    with pytest.raises(_build.KernelBuildError, match="nvcc not found"):
        api._pick_backend("cuda", cuda)  # asked for by name: the error, no fallback


def test_the_cuda_build_on_a_cpu_only_torch_is_a_named_error(monkeypatch):
    from recon.raster import _build

    monkeypatch.setattr(torch.version, "cuda", None)
    _build.load_cuda_extension.cache_clear()
    with pytest.raises(_build.KernelBuildError, match="this torch is a CPU-only build"):
        _build.load_cuda_extension()
