"""The torch reference keeps memory bounded: 256x256 with 50k Gaussians, forward and
backward, in a few GB (tiled, checkpointed compositing)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torch_reference_50k_at_256_fits_in_a_few_gb():
    code = textwrap.dedent(
        r"""
        import re, torch
        from bench.scenes import head_scene
        from recon.raster import rasterize
        s = head_scene(n=50_000, size=256, sh_degree=1)
        params = [t.clone().requires_grad_() for t in (s.means, s.quats, s.scales, s.opacities, s.colors)]
        out = rasterize(*params, s.viewmats, s.Ks, 256, 256, sh_degree=1, backend="torch")
        out.image.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in params)
        # VmHWM belongs to this process's own address space; ru_maxrss would carry over
        # the (large) peak of the pytest process that forked it.
        status = open("/proc/self/status").read()
        print(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) // 1024)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mib = int(r.stdout.strip().splitlines()[-1])
    print(f"peak RSS {peak_mib} MiB")
    assert peak_mib < 4096, f"torch reference used {peak_mib} MiB"
