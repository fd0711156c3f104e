"""The expression oracle's codes: pose-free, and whitened on the frames they are fitted on."""

import numpy as np
from scipy.spatial.transform import Rotation

from bench.expression_oracle import expression_codes, oracle_features


def test_codes_ignore_pose_and_follow_expression():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 3))
    modes = rng.normal(size=(2, 60, 3))
    weights = rng.normal(size=(40, 2))
    faces = base + 0.05 * np.einsum("tk,kpi->tpi", weights, modes)
    # Each frame seen under its own head pose, scale and position.
    rot = Rotation.from_rotvec(rng.normal(scale=0.15, size=(40, 3))).as_matrix()  # ~15 degrees
    posed = np.einsum("tij,tpj->tpi", rot, faces) * rng.uniform(0.5, 2, (40, 1, 1)) + rng.normal(size=(40, 1, 3))
    fit = list(range(30))
    codes = expression_codes(posed, fit, dims=4)
    unposed = expression_codes(faces, fit, dims=4)
    assert codes.shape == (40, 4) and codes.dtype == np.float32
    np.testing.assert_allclose(codes[fit].std(0), 1, rtol=1e-4)
    # Two modes of expression: the first two components carry them, the same with or without pose.
    np.testing.assert_allclose(np.abs(codes[:, :2]), np.abs(unposed[:, :2]), atol=0.05)
    r = np.corrcoef(np.c_[weights, codes[:, :2]].T)[:2, 2:]
    assert np.abs(r).max(1).min() > 0.9
    feats = oracle_features(codes, (40, 16, 80))
    assert feats.shape == (40, 16, 80) and float(feats[:, :, 4:].abs().max()) == 0
    np.testing.assert_allclose(feats[:, 5, :4].numpy(), codes)
