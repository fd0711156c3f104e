"""Our CUDA kernels (cuda/kernels/: projection and compositing, forward and backward, and
the hash encoding), run
on the CPU through the emulation layer (tests/cuda_emu): every CUDA thread an OS thread,
barriers and warp collectives checked. They must agree with the CPU extension (cuda/cpu)
on the same inputs: forward values to 1e-5, gradients to 1e-4 of each tensor's largest,
on random scenes, batched cameras, a head and a crop of the garden scene; give the same
result whatever order the blocks run in; and run clean under ThreadSanitizer and
AddressSanitizer + UBSan."""

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _cuda_emu import KERNEL_DIR, build_sanitized, load_emulated_kernels
from _scenes import random_scene
from bench.scenes import garden_scene, head_scene
from recon.raster._build import load_cpu_extension
from recon.raster import reference
from recon.raster.reference import tile_grid

TILE = 16


def stage_inputs(s, with_background=False, seed=0):
    """The compositing stage's inputs for scene `s`: projected with the CPU extension,
    depth as one more channel (as recon/raster/api.py does), tile lists sorted by it."""
    cpu = load_cpu_extension()
    s = s.to("cpu")
    radii, means2d, depths, conics, _ = cpu.project_forward(s.means, s.quats, s.scales, s.opacities, s.viewmats,
                                                              s.Ks, s.width, s.height, 0.3, 0.01, 1e10, False)
    C, N = means2d.shape[:2]
    colors = s.colors if s.colors.dim() == 2 else torch.sigmoid(s.colors[:, 0])
    features = torch.cat([colors.expand(C, N, -1), depths[..., None]], -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    backgrounds = torch.rand(C, features.shape[-1], generator=g) if with_background else None
    tiles_x, tiles_y = tile_grid(s.width, s.height, TILE)
    tile_offsets, flat_ids = cpu.isect_tiles(means2d, radii, depths, TILE, tiles_x, tiles_y)
    opacities = s.opacities[None].expand(C, N).contiguous()
    return (means2d, conics, features, opacities, backgrounds, s.width, s.height, TILE, tile_offsets, flat_ids)


def run_both(args, seed=0):
    """(cpu, emulated CUDA): each a dict of the forward outputs and the gradients of a
    random loss on image and alpha."""
    out = []
    for ext in (load_cpu_extension(), load_emulated_kernels()):
        render, alpha, final_t, last_ids = ext.rasterize_forward(*args)
        g = torch.Generator().manual_seed(seed)
        v_render, v_alpha = torch.randn(render.shape, generator=g), torch.randn(alpha.shape, generator=g)
        grads = ext.rasterize_backward(*args, final_t, last_ids, v_render, v_alpha.contiguous())
        out.append({"render": render, "alpha": alpha, "final_T": final_t, "last_ids": last_ids,
                    **{f"v_{name}": v for name, v in zip(("means2d", "conics", "features", "opacities",
                                                          "backgrounds"), grads) if v is not None}})
    return out


def run_reference(args, seed=0):
    """The torch reference's compositing (recon/raster/reference.py) of the same stage
    inputs, with the gradients of run_both's random loss through autograd."""
    means2d, conics, features, opacities, backgrounds, *rest = args
    leaves = [t.clone().requires_grad_(True) if t is not None else None
              for t in (means2d, conics, features, opacities, backgrounds)]
    render, alpha = reference.composite(*leaves, *rest)
    g = torch.Generator().manual_seed(seed)
    v_render, v_alpha = torch.randn(render.shape, generator=g), torch.randn(alpha.shape, generator=g)
    ((render * v_render).sum() + (alpha * v_alpha).sum()).backward()
    return {"render": render.detach(), "alpha": alpha.detach(),
            **{f"v_{name}": t.grad for name, t in zip(("means2d", "conics", "features", "opacities", "backgrounds"),
                                                       leaves) if t is not None}}


def assert_agree_with_reference(ref, cuda):
    """Values to 1e-5, gradients to 1e-4 of each tensor's largest, as against the CPU."""
    for key, value in ref.items():
        scale = value.abs().max().item() if key.startswith("v_") else 1.0
        torch.testing.assert_close(cuda[key], value, rtol=0, atol=(1e-4 if key.startswith("v_") else 1e-5) * scale
                                   + 1e-7, msg=f"{key} against the torch reference")


def assert_kernels_agree(cpu, cuda):
    for key in ("render", "alpha", "final_T"):
        torch.testing.assert_close(cuda[key], cpu[key], rtol=0, atol=1e-5, msg=key)
    mismatched = (cuda["last_ids"] != cpu["last_ids"]).float().mean().item()
    assert mismatched <= 1e-3, f"last_ids differ at {mismatched:.2%} of the pixels"
    for key in (k for k in cpu if k.startswith("v_")):
        scale = cpu[key].abs().max().item()
        torch.testing.assert_close(cuda[key], cpu[key], rtol=0, atol=1e-4 * scale + 1e-7, msg=key)


CONFIGS = {  # name: (scene, background)
    "1 camera, rgb": (lambda: random_scene(n=120, cameras=1, width=40, height=30, seed=1), False),
    "2 cameras, 1 channel": (lambda: random_scene(n=150, cameras=2, width=33, height=47, feat_dim=1, seed=2), True),
    "3 cameras, 2 channels": (lambda: random_scene(n=100, cameras=3, width=48, height=20, feat_dim=2, seed=3), False),
    "opaque and large": (lambda: random_scene(n=80, cameras=2, width=35, height=35, seed=4, scale_range=(0.1, 0.4),
                                              opacity_range=(0.97, 1.0)), True),  # the 0.99 clamp is reached
    "faint and small": (lambda: random_scene(n=200, cameras=1, width=50, height=40, seed=5, scale_range=(0.005, 0.03),
                                             opacity_range=(0.004, 0.2)), False),
    "sh colours": (lambda: random_scene(n=120, cameras=2, width=31, height=17, sh_degree=1, seed=6), True),
    "head, 2 cameras": (lambda: head_scene(n=600, size=32, cameras=2, sh_degree=0), False),
}


PROJECTION_CONFIGS = {  # name: (scene, antialiased)
    "3 cameras": (lambda: random_scene(n=300, cameras=3, width=64, height=40, seed=11), False),
    "antialiased": (lambda: random_scene(n=300, cameras=2, width=50, height=50, seed=12), True),
    "head": (lambda: head_scene(n=700, size=64, cameras=2, sh_degree=0), True),
}


@pytest.mark.parametrize("name", PROJECTION_CONFIGS)
def test_emulated_projection_agrees_with_the_cpu_kernels(name):
    make, antialiased = PROJECTION_CONFIGS[name]
    s = make().to("cpu")
    inputs = (s.means.contiguous(), F.normalize(s.quats, dim=-1).contiguous(), s.scales.contiguous(),
              s.opacities.contiguous(), s.viewmats.contiguous(), s.Ks.contiguous())
    results = []
    for ext in (load_cpu_extension(), load_emulated_kernels()):
        radii, means2d, depths, conics, comps = ext.project_forward(*inputs, s.width, s.height, 0.3, 0.01, 1e10,
                                                                    antialiased)
        g = torch.Generator().manual_seed(3)
        v = [torch.randn(t.shape, generator=g) for t in (means2d, depths, conics, comps)]
        grads = ext.project_backward(*inputs[:3], inputs[4], inputs[5], s.width, s.height, 0.3, radii, conics, comps,
                                     *v[:3], v[3] if antialiased else None, True)
        results.append({"radii": radii, "means2d": means2d, "depths": depths, "conics": conics, "comps": comps,
                        **dict(zip(("v_means", "v_quats", "v_scales", "v_viewmats"), grads))})
    cpu, cuda = results
    assert (cpu["radii"] > 0).any(-1).float().mean() > 0.3  # most Gaussians are seen
    assert torch.equal(cuda["radii"], cpu["radii"])
    for key, value in cpu.items():
        if key != "radii":
            scale = value.abs().max().item()
            tolerance = (1e-4 if key.startswith("v_") else 1e-5) * scale + 1e-7
            torch.testing.assert_close(cuda[key], value, rtol=0, atol=tolerance, msg=key)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_emulated_spherical_harmonics_agree_with_the_cpu_kernels(degree):
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(3, 200, 3, generator=g) * torch.rand(3, 200, 1, generator=g) * 4  # any length
    coeffs = torch.randn(200, 16, 3, generator=g) * 0.3  # more bands than the degree uses
    v_colors = torch.randn(3, 200, 3, generator=g)
    cpu, cuda = ({"colors": ext.sh_forward(degree, dirs, coeffs),
                  **dict(zip(("v_dirs", "v_coeffs"), ext.sh_backward(degree, dirs, coeffs, v_colors, True)))}
                 for ext in (load_cpu_extension(), load_emulated_kernels()))
    for key, value in cpu.items():
        scale = value.abs().max().item()
        torch.testing.assert_close(cuda[key], value, rtol=0, atol=1e-5 * scale + 1e-7, msg=key)
    unused = slice((degree + 1) ** 2, None)  # bands past the degree get no gradient
    assert cpu["v_coeffs"][:, unused].abs().sum() == cuda["v_coeffs"][:, unused].abs().sum() == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_emulated_cuda_kernels_agree_with_the_cpu_kernels_and_the_torch_reference(name):
    make, with_background = CONFIGS[name]
    args = stage_inputs(make(), with_background)
    cpu, cuda = run_both(args)
    assert cpu["alpha"].max() > 0.2  # something was drawn
    assert_kernels_agree(cpu, cuda)
    assert_agree_with_reference(run_reference(args), cuda)


def project_scene(s, antialiased=False):
    """(means2d, radii, depths) of scene `s`, projected by the CPU extension."""
    radii, means2d, depths, _, _ = load_cpu_extension().project_forward(
        s.means, F.normalize(s.quats, dim=-1).contiguous(), s.scales, s.opacities, s.viewmats, s.Ks, s.width,
        s.height, 0.3, 0.01, 1e10, antialiased)
    return means2d, radii, depths


def garden_crop(path, size=16):
    """The middle size x size pixels of gsplat's garden scene (principal point moved), with
    only the Gaussians seen there (the emulation runs an OS thread per CUDA thread)."""
    s = garden_scene(path)
    s.Ks = s.Ks.clone()
    s.Ks[:, 0, 2] -= (s.width - size) / 2
    s.Ks[:, 1, 2] -= (s.height - size) / 2
    s.width = s.height = size
    seen = (project_scene(s)[1] > 0).all(-1).any(0)
    for field in ("means", "quats", "scales", "opacities", "colors"):
        setattr(s, field, getattr(s, field)[seen].contiguous())
    return s


TILE_CONFIGS = {name: make for name, (make, _) in CONFIGS.items()} | {
    "8 cameras, 3 x 2 tiles": lambda: random_scene(n=90, cameras=8, width=48, height=20, seed=14),
    "one tile": lambda: random_scene(n=50, cameras=1, width=16, height=16, seed=15),
    "nothing visible": lambda: random_scene(n=30, cameras=2, width=40, height=40, seed=13),
    "no Gaussians": lambda: random_scene(n=0, cameras=2, width=40, height=40, seed=13),
    "equal depths": lambda: random_scene(n=60, cameras=2, width=40, height=30, seed=16),
}


@pytest.mark.parametrize("name", TILE_CONFIGS)
def test_emulated_tile_intersection_agrees_with_the_cpu(name):
    """CUB's prefix sum and radix sort (emulated) list exactly the CPU's entries, in its
    order: camera, tile, depth, then id."""
    s = TILE_CONFIGS[name]().to("cpu")
    means2d, radii, depths = project_scene(s)
    if name == "equal depths":  # ties must keep increasing id order on both
        depths = torch.full_like(depths, 2.5)
    if name == "nothing visible":
        radii = torch.zeros_like(radii)
    tiles_x, tiles_y = tile_grid(s.width, s.height, TILE)
    cpu, cuda = (ext.isect_tiles(means2d, radii, depths, TILE, tiles_x, tiles_y)
                 for ext in (load_cpu_extension(), load_emulated_kernels()))
    assert (cpu[1].numel() == 0) == (name in ("nothing visible", "no Gaussians"))
    assert cuda[0].shape == cpu[0].shape and torch.equal(cuda[0], cpu[0])
    assert torch.equal(cuda[1], cpu[1])


OP_CONFIGS = {  # name: (scene, antialiased)
    "sh, 2 cameras, background": (lambda: random_scene(n=200, cameras=2, width=40, height=34, sh_degree=2, seed=17),
                                  False),
    "antialiased, 3 cameras": (lambda: random_scene(n=150, cameras=3, width=36, height=30, seed=18), True),
    "head, 2 cameras": (lambda: head_scene(n=500, size=32, cameras=2, sh_degree=1), False),
}


@pytest.mark.parametrize("name", OP_CONFIGS)
def test_the_cuda_op_through_rasterize_agrees_with_the_cpu_and_torch_backends(name, monkeypatch):
    """The whole op as `backend="cuda"` runs it (cuda/kernels/bindings.cpp under the
    rasterizer's autograd wrappers), emulated on CPU tensors: image, alpha, depth and the
    gradients of every differentiable input against the CPU kernels and the torch
    reference."""
    from recon.raster import kernels_backend, rasterize

    make, antialiased = OP_CONFIGS[name]
    s = make().to("cpu")
    g = torch.Generator().manual_seed(5)
    background = torch.rand(3, generator=g)
    weights = None

    def run(backend):
        nonlocal weights
        leaves = [t.clone().requires_grad_(True) for t in (s.means, s.quats, s.scales, s.opacities, s.colors,
                                                            s.viewmats, background)]
        out = rasterize(*leaves[:6], s.Ks, s.width, s.height, sh_degree=s.sh_degree, backgrounds=leaves[6],
                        antialiased=antialiased, backend=backend)
        if weights is None:
            weights = [torch.randn(t.shape, generator=g) for t in (out.image, out.alpha, out.depth)]
        sum(((t * w).sum() for t, w in zip((out.image, out.alpha, out.depth), weights))).backward()
        # depth is the composited depth over alpha: compare the composited channel, which
        # faint pixels do not amplify
        return {"image": out.image, "alpha": out.alpha, "depth x alpha": out.depth * out.alpha,
                **{f"v_{k}": t.grad for k, t in zip(("means", "quats", "scales", "opacities", "colors", "viewmats",
                                                     "background"), leaves)}}

    cpu, torch_ref = run("cpu"), run("torch")
    calls = []
    monkeypatch.setattr(kernels_backend, "extension", lambda device: calls.append(device) or load_emulated_kernels())
    cuda = run("cpu")  # the CPU's pick, with the CUDA op's functions in place of the CPU extension's
    assert len(calls) >= 5  # projection, tile lists and compositing, forward and backward (and SH)
    assert cpu["alpha"].max() > 0.2
    for other in (cpu, torch_ref):
        for key, value in other.items():
            scale = value.abs().max().item()
            tolerance = (1e-4 if key.startswith("v_") else 1e-5) * scale + 1e-7
            torch.testing.assert_close(cuda[key], value, rtol=0, atol=tolerance, msg=key)


def test_garden_crop_agrees(garden_path):
    s = garden_crop(garden_path)
    means2d, radii, depths = project_scene(s)
    cpu, cuda = (ext.isect_tiles(means2d, radii, depths, TILE, 1, 1) for ext in (load_cpu_extension(),
                                                                                 load_emulated_kernels()))
    assert cpu[1].numel() > 1000
    assert torch.equal(cuda[0], cpu[0]) and torch.equal(cuda[1], cpu[1])
    args = stage_inputs(s, with_background=True)
    cpu, cuda = run_both(args)
    assert cpu["alpha"].mean() > 0.5
    assert_kernels_agree(cpu, cuda)
    assert_agree_with_reference(run_reference(args), cuda)


@pytest.mark.parametrize("order", ["reverse", "shuffle7"])
def test_results_do_not_depend_on_block_order(order, monkeypatch):
    args = stage_inputs(random_scene(n=150, cameras=2, width=40, height=36, seed=8), with_background=True)
    in_order = run_both(args)[1]
    monkeypatch.setenv("CUDA_EMU_BLOCK_ORDER", order)
    reordered = run_both(args)[1]
    for key in ("render", "alpha", "final_T", "last_ids"):  # no atomics: bit-identical
        assert torch.equal(reordered[key], in_order[key]), key
    for key in (k for k in in_order if k.startswith("v_")):  # float atomics: summed in another order
        scale = in_order[key].abs().max().item()
        torch.testing.assert_close(reordered[key], in_order[key], rtol=0, atol=1e-5 * scale + 1e-7, msg=key)


def test_unsupported_channels_and_tiles_are_refused():
    """The kernels refuse what they are not built for, exactly where the rasterizer's
    backend pick (CUDA_KERNEL_LIMITS) stops sending work to them."""
    from recon.raster.api import CUDA_KERNEL_LIMITS

    most = CUDA_KERNEL_LIMITS["max_channels"]
    args = list(stage_inputs(random_scene(n=20, cameras=1, width=16, height=16, feat_dim=most)))
    load_emulated_kernels().rasterize_forward(*args)  # colour + depth: accepted
    args = list(stage_inputs(random_scene(n=20, cameras=1, width=16, height=16, feat_dim=most + 1)))
    with pytest.raises(RuntimeError, match="not built for these arguments"):
        load_emulated_kernels().rasterize_forward(*args)
    args = list(stage_inputs(random_scene(n=20, cameras=1, width=16, height=16)))
    args[7] = CUDA_KERNEL_LIMITS["tile_size"] // 2
    with pytest.raises(RuntimeError, match="not built for these arguments"):
        load_emulated_kernels().rasterize_forward(*args)


def run_standalone(exe, mode, sizes, tensors, tmp_path):
    """sanitize_main `exe` run in `mode` on int64 `sizes` then `tensors` (float32; int64
    ones as they are): (the finished process, the raw output bytes)."""
    blob = np.array(sizes, np.int64).tobytes() + b"".join(
        t.numpy().tobytes() if t.dtype == torch.int64 else t.numpy().astype(np.float32).tobytes() for t in tensors)
    (tmp_path / "in").write_bytes(blob)
    (tmp_path / "out").unlink(missing_ok=True)
    run = subprocess.run([str(exe), mode, str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600)
    out = tmp_path / "out"
    return run, np.frombuffer(out.read_bytes(), np.uint8) if out.is_file() else np.zeros(0, np.uint8)


def is_clean(run) -> bool:
    return run.returncode == 0 and "Sanitizer" not in run.stderr and "runtime error" not in run.stderr


def outputs_match(raw, expected: dict) -> str | None:
    """None when the standalone program's outputs, in order, equal the extension's
    `expected`; else what differs."""
    at = 0
    for name, t in expected.items():
        dtype = {torch.int32: np.int32, torch.int64: np.int64}.get(t.dtype, np.float32)
        n = t.numel() * np.dtype(dtype).itemsize
        if at + n > len(raw):
            return f"the output ends before {name}"
        got = torch.from_numpy(raw[at:at + n].copy().view(dtype)).reshape(t.shape)
        at += n
        if t.numel() and not torch.allclose(got.double(), t.double(), rtol=0,
                                            atol=1e-6 * max(1.0, t.abs().max().item())):
            return f"{name} differs"
    return None if at == len(raw) else "the output is longer than expected"


def standalone_cases(s, seed=1):
    """{mode: (sizes, inputs, the emulated extension's outputs)} for scene `s`: every kernel
    of cuda/kernels, as sanitize_main's modes take them."""
    ext = load_emulated_kernels()
    g = torch.Generator().manual_seed(seed)
    args = stage_inputs(s, with_background=True)
    means2d, conics, features, opacities, backgrounds, width, height, _, tile_offsets, flat_ids = args
    C, N, D = features.shape
    tiles_x, tiles_y = tile_offsets.shape[2], tile_offsets.shape[1]
    v_render, v_alpha = torch.randn(C, height, width, D, generator=g), torch.randn(C, height, width, 1, generator=g)
    render, alpha, final_t, last_ids = ext.rasterize_forward(*args)
    grads = ext.rasterize_backward(*args, final_t, last_ids, v_render, v_alpha)
    cases = {"raster": ([C, N, D, width, height, tiles_x, tiles_y, len(flat_ids), 1],
                        [means2d, conics, features, opacities, backgrounds, v_render, v_alpha, tile_offsets, flat_ids],
                        {"render": render, "alpha": alpha, "final_T": final_t, "last_ids": last_ids,
                         **dict(zip(("v_means2d", "v_conics", "v_features", "v_opacities", "v_backgrounds"), grads))})}

    inputs = [s.means, F.normalize(s.quats, dim=-1).contiguous(), s.scales, s.opacities, s.viewmats, s.Ks]
    projected = ext.project_forward(*inputs, width, height, 0.3, 0.01, 1e10, True)
    v = [torch.randn(t.shape, generator=g) for t in projected[1:]]
    p_grads = ext.project_backward(*inputs[:3], *inputs[4:], width, height, 0.3, projected[0], projected[3],
                                   projected[4], *v, True)
    cases["project"] = ([C, N, width, height, 1], [*inputs, *v],
                        dict(zip(("radii", "means2d", "depths", "conics", "comps", "v_means", "v_quats", "v_scales",
                                  "v_viewmats"), (*projected, *p_grads))))

    dirs, coeffs, v_colors = torch.randn(C, N, 3, generator=g), torch.randn(N, 16, 3, generator=g), \
        torch.randn(C, N, 3, generator=g)
    cases["sh"] = ([C, N, 16, 3], [dirs, coeffs, v_colors],
                   {"colors": ext.sh_forward(3, dirs, coeffs),
                    **dict(zip(("v_dirs", "v_coeffs"), ext.sh_backward(3, dirs, coeffs, v_colors, True)))})

    means2d, radii, depths = project_scene(s)
    cases["tiles"] = ([C, N, tiles_x, tiles_y], [means2d, radii.float(), depths],
                      dict(zip(("tile_offsets", "flat_ids"),
                               ext.isect_tiles(means2d, radii, depths, TILE, tiles_x, tiles_y))))

    x, table, scales, res = hash_inputs(3, 2, points=48, seed=seed)
    v_out = torch.randn(len(x), table.shape[0] * table.shape[2], generator=g)
    cases["hash"] = ([*x.shape, *table.shape], [x, table, scales, res.float(), v_out],
                     dict(zip(("out", "v_table", "v_x"), (ext.hash_encode_forward(x, table, scales, res),
                                                          *ext.hash_encode_backward(x, table, scales, res, v_out, True)))))
    return cases


def hash_inputs(dims, features, points=300, seed=0, log2_table_size=6):
    """A small hash grid (float32): its coarse levels dense, its fine ones hashed into a
    table of 2^log2_table_size rows that many points share; points partly outside the cube."""
    from recon.fields import HashGridConfig, level_grid

    cfg = HashGridConfig(dims=dims, levels=4, features=features, log2_table_size=log2_table_size, base_resolution=2,
                         max_resolution=40)
    scales, res = level_grid(cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(points, dims, generator=g) * 1.1 - 0.05
    table = torch.randn(cfg.levels, cfg.table_size, features, generator=g)
    return x, table, scales.float(), res


@pytest.mark.parametrize("dims,features", [(2, 1), (2, 8), (3, 2), (3, 4)])
def test_emulated_hash_encoding_agrees_with_the_cpu_kernels(dims, features):
    """The CUDA hash encoding (one thread per point and level; the table's gradient added
    atomically) against the CPU op: the encoding to 1e-6, both gradients to 1e-5 of
    their largest."""
    x, table, scales, res = hash_inputs(dims, features)
    v_out = torch.randn(len(x), table.shape[0] * features, generator=torch.Generator().manual_seed(1))
    cpu, emu = load_cpu_extension(), load_emulated_kernels()
    torch.testing.assert_close(emu.hash_encode_forward(x, table, scales, res),
                               cpu.hash_encode_forward(x, table, scales, res), rtol=0, atol=1e-6)
    for got, want in zip(emu.hash_encode_backward(x, table, scales, res, v_out, True),
                         cpu.hash_encode_backward(x, table, scales, res, v_out, True)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    with pytest.raises(RuntimeError, match="not built for these arguments"):
        emu.hash_encode_forward(x, table[..., :1].expand(-1, -1, 3).contiguous(), scales, res)


@pytest.mark.parametrize("sanitizer", ["thread", "address"])
def test_kernels_are_clean_under_sanitizers(sanitizer, tmp_path):
    """Tiny scenes (2 cameras, 2 x 2 tiles each) through every kernel (tile lists,
    projection, SH, compositing; and a small hash grid) in a standalone program built
    with the sanitizer: no report, and the results of the extension."""
    exe = build_sanitized(sanitizer)
    for mode, (sizes, inputs, expected) in standalone_cases(tiny_scene()).items():
        run, raw = run_standalone(exe, mode, sizes, inputs, tmp_path)
        assert is_clean(run), f"{mode}: {run.stderr}"
        assert outputs_match(raw, expected) is None, f"{mode}: {outputs_match(raw, expected)}"


def tiny_scene():
    return random_scene(n=40, cameras=2, width=32, height=20, seed=9)


def full_batch_scene():
    """One tile listing more Gaussians than a shared-memory batch holds, faint and large
    enough that no pixel stops before the last batch."""
    return random_scene(n=300, cameras=1, width=16, height=16, seed=9, scale_range=(0.3, 0.6),
                        opacity_range=(0.005, 0.02))


PLANTED_BUGS = {  # name: (file in cuda/kernels, text, replaced by, sanitizer, mode, scene, what catches it)
    "nothing planted": ("rasterize_forward.cu", "", "", "address", "raster", full_batch_scene, None),
    "a removed __syncthreads": ("rasterize_forward.cu", "    __syncthreads();\n    const int count",
                                "    const int count", "thread", "raster", tiny_scene, "ThreadSanitizer: data race"),
    "a non-atomic accumulation": ("rasterize_backward.cu", "{ atomicAdd(at, value); }", "{ *at += value; }", "thread",
                                  "raster", tiny_scene, "ThreadSanitizer: data race"),
    "a non-atomic hash-table gradient": ("hash_encode_backward.cu", "{ atomicAdd(at, v); }", "{ *at += v; }",
                                         "thread", "hash", tiny_scene, "ThreadSanitizer: data race"),
    "a sort with one key bit too few": ("tile_intersect.cu", "return 32 + splat::index_bits(",
                                        "return 31 + splat::index_bits(", "address", "tiles", tiny_scene, "differs"),
    "a shared array one batch too small": ("rasterize_forward.cu", "__shared__ float2 s_mean[kBlock];",
                                           "__shared__ float2 s_mean[kBlock - 1];", "address", "raster",
                                           full_batch_scene,
                                           "insufficient space for an object of type 'struct float2'"),
}


@pytest.mark.parametrize("name", PLANTED_BUGS)
def test_the_checks_catch_a_planted_bug(name, tmp_path):
    """Mutation test of the harness: a copy of the kernels with one bug planted, built and
    run as the sanitizer test does, must be reported, by the sanitizer (AddressSanitizer
    + UBSan or ThreadSanitizer) or by outputs that differ from the correct kernels'."""
    file, text, replacement, sanitizer, mode, make_scene, caught_by = PLANTED_BUGS[name]
    kernels = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, kernels)
    source = (kernels / file).read_text()
    assert text == "" or source.count(text) == 1, f"{file} no longer holds {text!r} once: update the mutation"
    (kernels / file).write_text(source.replace(text, replacement) if text else source)
    sizes, inputs, expected = standalone_cases(make_scene())[mode]
    if make_scene is full_batch_scene:
        assert (expected["last_ids"] > 256).any()
    run, raw = run_standalone(build_sanitized(sanitizer, kernels), mode, sizes, inputs, tmp_path)
    found = run.stderr if not is_clean(run) else outputs_match(raw, expected) or ""
    if caught_by is None:
        assert is_clean(run) and outputs_match(raw, expected) is None, found
    else:
        assert caught_by in found, found


EMULATION_CATCHES = {  # kernel body -> what cuda_emu says
    "divergent barrier": ("if (threadIdx.x < 5) { __syncthreads(); } else { __syncthreads(); }",
                          "divergent collective"),
    "shuffle from an exited lane": ("if (threadIdx.x == 3) return; "
                                    "out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);",
                                    "mask names lane 3, which has exited"),
    "warp op at two sites": ("float v = threadIdx.x < 16 ? __shfl_down_sync(0xffffffffu, 1.f, 1) "
                             ": __shfl_down_sync(0xffffffffu, 2.f, 1); out[threadIdx.x] = v;", "divergent collective"),
}


@pytest.mark.parametrize("name", EMULATION_CATCHES)
def test_the_emulation_names_what_a_gpu_would_hang_on_or_garble(name, tmp_path):
    from _cuda_emu import INCLUDES

    body, said = EMULATION_CATCHES[name]
    (tmp_path / "k.cpp").write_text(f"""#include <cuda_runtime.h>
__global__ void k(float* out) {{ {body} }}
int main() {{ float out[32] = {{}}; ::cuda_emu::launch(k, dim3(1), dim3(32), nullptr, out); return 0; }}
""")
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", *(f"-I{p}" for p in INCLUDES), str(tmp_path / "k.cpp"),
                    "-o", str(tmp_path / "k")], check=True)
    run = subprocess.run([str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and said in run.stderr, run.stderr
