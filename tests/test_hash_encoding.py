"""The multi-resolution hash encoding (recon/fields/hash_encoding.py): its torch reference
against Instant-NGP's definition, our CPU op against the reference on values and both
gradients, finite differences (gradcheck) of the op's hand-written backward, and a grid
that learns an image. The CUDA op is checked against the CPU op in test_cuda_kernels.py."""

import math

import pytest
import torch

from recon.fields import HashEncoding, HashGridConfig, hash_encode, hash_encode_reference, level_grid
from recon.fields.hash_encoding import PRIMES


def _grid(dims, features, log2_table_size=8, levels=5, dtype=torch.float64, seed=0):
    cfg = HashGridConfig(dims=dims, levels=levels, features=features, log2_table_size=log2_table_size,
                         base_resolution=3, max_resolution=200)
    scales, res = level_grid(cfg)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(cfg.levels, cfg.table_size, features, generator=g, dtype=dtype)
    return cfg, table, scales.to(dtype), res


def test_levels_grow_geometrically_and_coarse_ones_are_dense():
    cfg = HashGridConfig(levels=16, base_resolution=16, max_resolution=2048, log2_table_size=19)
    scales, res = level_grid(cfg)
    assert scales[0] == 15 and math.isclose(scales[-1], 2047, rel_tol=1e-9)
    growth = (scales[1:] + 1) / (scales[:-1] + 1)
    assert torch.allclose(growth, torch.full_like(growth, 2 ** (7 / 15)))
    assert res.tolist()[:3] == [17, 23, 32]  # floor(scale + 0.5) + 2: every corner of the cube on the grid
    dense = [int(r) ** 3 <= cfg.table_size for r in res]
    assert dense[:5] == [True] * 5 and not any(dense[5:])  # 82^3 > 2^19: hashed from level 5 on


@pytest.mark.parametrize("dims", [2, 3])
def test_the_reference_interpolates_its_dense_levels_and_hashes_the_fine_ones(dims):
    """A dense level holding a linear function of its corners' coordinates gives that
    function back anywhere inside (D-linear interpolation is exact on it); a hashed level
    reads the row Instant-NGP's hash names."""
    cfg = HashGridConfig(dims=dims, levels=2, features=1, log2_table_size=12, base_resolution=4, max_resolution=400)
    scales, res = level_grid(cfg)
    assert int(res[0]) ** dims <= cfg.table_size < int(res[1]) ** dims
    slope = torch.tensor([0.7, -1.3, 2.1][:dims], dtype=torch.float64)
    table = torch.zeros(2, cfg.table_size, 1, dtype=torch.float64)
    r = int(res[0])
    coords = torch.stack(torch.meshgrid(*[torch.arange(r)] * dims, indexing="ij"), -1).reshape(-1, dims)
    rows = sum(coords[:, d] * r**d for d in range(dims))
    table[0, rows, 0] = coords.double() @ slope + 0.25
    x = torch.rand(200, dims, dtype=torch.float64)
    out = hash_encode_reference(x, table, scales.double(), res)
    torch.testing.assert_close(out[:, 0], (x * scales[0] + 0.5) @ slope + 0.25)

    corner = [5, 9, 2][:dims]  # a point exactly on a grid corner of the hashed level reads that corner's row
    x = (torch.tensor(corner, dtype=torch.float64) - 0.5) / scales[1]
    row = 0
    for d in range(dims):
        row ^= (corner[d] * PRIMES[d]) & 0xFFFFFFFF
    table[1, row % cfg.table_size, 0] = 3.0
    assert hash_encode_reference(x[None], table, scales.double(), res)[0, 1].item() == pytest.approx(3.0)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("features", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_op_agrees_with_the_reference(dims, features, dtype):
    """Values, the table's gradient and the positions' gradient, on dense and hashed
    levels, with points inside and outside the cube (clamped; no position gradient)."""
    _, table, scales, res = _grid(dims, features, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(400, dims, generator=g, dtype=dtype) * 1.2 - 0.1)
    v_out = torch.randn(400, table.shape[0] * features, generator=g, dtype=dtype)
    results = []
    for backend in ("kernels", "torch"):
        xb, tb = x.clone().requires_grad_(), table.clone().requires_grad_()
        out = hash_encode(xb, tb, scales, res, backend)
        out.backward(v_out)
        results.append((out.detach(), tb.grad, xb.grad))
    tol = 1e-5 if dtype == torch.float32 else 1e-11  # of each tensor's largest value
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())
    outside = ((x < 0) | (x > 1))
    assert outside.any() and (results[0][2][outside] == 0).all()


@pytest.mark.parametrize("dims", [2, 3])
def test_the_cpu_ops_backward_passes_gradcheck(dims):
    _, table, scales, res = _grid(dims, 2, log2_table_size=6, levels=3)
    x = torch.rand(12, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    x.requires_grad_(True)
    table.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t: hash_encode(x, t, scales, res, "kernels"), (x, table),
                                    eps=1e-6, atol=1e-6)


def test_a_hash_grid_learns_an_image():
    """A 2-d grid and a linear read-out fit a 64 x 64 picture (two rings and a bar) in 300
    Adam steps to better than 30 dB; the table's gradient is what makes it learn."""
    torch.manual_seed(0)
    side = 64
    u, v = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    x = torch.stack([u, v], -1).reshape(-1, 2)
    r = torch.hypot(u - 0.4, v - 0.55)
    image = (0.5 + 0.4 * torch.sin(40 * r) * torch.exp(-4 * r) + 0.3 * ((u > 0.7) & (v < 0.3))).reshape(-1, 1)
    enc = HashEncoding(HashGridConfig(dims=2, levels=8, features=2, log2_table_size=12, base_resolution=4,
                                      max_resolution=64), backend="kernels")
    head = torch.nn.Linear(enc.cfg.out_features, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.mean((head(enc(x)) - image) ** 2)
        loss.backward()
        opt.step()
    psnr = -10 * math.log10(loss.item())
    assert psnr > 30, psnr


def test_the_module_checks_its_inputs():
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        HashGridConfig(dims=4)
    with pytest.raises(ValueError, match="features per level must be 1, 2, 4 or 8"):
        HashGridConfig(features=3)
    enc = HashEncoding(HashGridConfig(dims=3, levels=2, log2_table_size=8))
    assert enc(torch.rand(5, 7, 3)).shape == (5, 7, 4)
    with pytest.raises(ValueError, match="3-d points got points of 2 coordinates"):
        enc(torch.rand(5, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        HashEncoding(backend="tcnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("dims", [2, 3])
def test_the_cuda_op_agrees_with_the_cpu_op_on_gpu(dims):
    """Our CUDA kernels on a real GPU (the emulated ones are checked in
    test_cuda_kernels.py): the encoding to 1e-6 and both gradients to 1e-5 of their
    largest, against the CPU op on the same inputs."""
    _, table, scales, res = _grid(dims, 2, log2_table_size=10, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(5000, dims, generator=g) * 1.1 - 0.05
    v_out = torch.randn(5000, table.shape[0] * 2, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        xb = x.to(device).requires_grad_()
        tb = table.to(device).requires_grad_()
        out = hash_encode(xb, tb, scales.to(device), res.to(device), "kernels")
        out.backward(v_out.to(device))
        results.append([t.detach().cpu() for t in (out, tb.grad, xb.grad)])
    for (want, got), tol in zip(zip(*results), (1e-6, 1e-5, 1e-5)):
        torch.testing.assert_close(got, want, rtol=0, atol=tol * max(1.0, want.abs().max().item()))
