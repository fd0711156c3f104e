"""The speech-to-motion stage and the mesh skinning: tracked motion is pose-free, the
basis round-trips, the skinning separates the lips along the mouth slit, and MotionNet
learns a speech-dependent motion with its velocity."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from avatar.dataset_format import LEFT_EYE, LOWER_LIP, N_LANDMARKS, RIGHT_EYE, RIGID, UPPER_LIP, face_triangles
from recon.motion import (MotionBasis, MotionNet, MotionRig, bind_to_mesh, closest_on_triangles, fit_motion_net,
                          fit_motion_stage, tracked_offsets)


def canonical_face(seed: int = 0) -> np.ndarray:
    """[478, 3] a face-sized cloud in the head frame; the lower half (y < 0) is the mouth region."""
    rng = np.random.default_rng(seed)
    face = rng.uniform(-1, 1, (N_LANDMARKS, 3)) * [0.07, 0.1, 0.03]
    face[list(RIGID), 1] = np.abs(face[list(RIGID), 1]) + 0.01  # rigid points above the mouth
    face[2, 1] = 0.0  # the nose base: points below it move
    return face


def test_tracked_offsets_ignore_pose_scale_and_axes():
    face = canonical_face()
    rng = np.random.default_rng(1)
    expression = np.zeros((5, N_LANDMARKS, 3))
    expression[:, face[:, 1] < 0, 1] = rng.normal(scale=0.004, size=(5, 1))  # the jaw drops or rises
    frames = []
    for t in range(5):
        R = Rotation.from_rotvec(rng.normal(scale=0.2, size=3)).as_matrix()
        posed = (face + expression[t]) @ R.T * 2000 + rng.normal(size=3) * 50  # pixels
        frames.append(posed * [1, -1, -1])  # mediapipe axes: y down, z away
    off = tracked_offsets(np.stack(frames), face, list(RIGID))
    np.testing.assert_allclose(off, expression, atol=1e-6)


def test_basis_round_trips_and_moves_only_the_lower_face():
    face = canonical_face()
    rng = np.random.default_rng(2)
    lower = face[:, 1] < 0
    modes = rng.normal(size=(3, N_LANDMARKS, 3)) * lower[:, None]
    weights = rng.normal(size=(40, 3))
    offsets = np.einsum("tk,kpi->tpi", weights, modes) * 1e-3
    basis = MotionBasis.fit(offsets.astype(np.float32), face, components=3)
    codes = basis.encode(torch.from_numpy(offsets).float())
    torch.testing.assert_close(codes.std(0), torch.ones(3), rtol=1e-3, atol=1e-3)  # whitened
    back = basis.decode(codes)
    torch.testing.assert_close(back, torch.from_numpy(offsets).float(), atol=1e-6, rtol=1e-4)
    assert float(back[:, ~torch.from_numpy(lower)].abs().max()) == 0


def test_upper_face_codes_move_the_brows_and_never_the_mouth():
    """With `upper` codes, the basis has a second block for the face above the nose base:
    each block's codes move only its own vertices, the rigid points and the eyes' contours
    move with neither, and a brow raise round-trips through the upper codes alone."""
    face = canonical_face()
    eyes = np.zeros(N_LANDMARKS, bool)
    eyes[list(RIGHT_EYE) + list(LEFT_EYE)] = True
    face[eyes, 1] = np.abs(face[eyes, 1]) + 0.01  # the eyes above the nose base, as in a face
    rng = np.random.default_rng(3)
    lower = face[:, 1] < face[2, 1]
    still = np.zeros(N_LANDMARKS, bool)
    still[list(RIGID) + list(RIGHT_EYE) + list(LEFT_EYE)] = True
    upper = ~lower & ~still
    mouth = rng.normal(size=(2, N_LANDMARKS, 3)) * lower[:, None]
    brows = rng.normal(size=(1, N_LANDMARKS, 3)) * upper[:, None]
    blink = rng.normal(size=(N_LANDMARKS, 3)) * eyes[:, None]  # the eye signal's, not the codes'
    weights = rng.normal(size=(40, 4))
    offsets = (np.einsum("tk,kpi->tpi", weights[:, :2], mouth) + weights[:, 2, None, None] * brows[0]
               + weights[:, 3, None, None] * blink) * 1e-3
    basis = MotionBasis.fit(offsets.astype(np.float32), face, components=2, upper=1)
    assert basis.dim == 3 and basis.spoken == 2
    codes = basis.encode(torch.from_numpy(offsets).float())
    torch.testing.assert_close(basis.decode(codes), torch.from_numpy(offsets * ~eyes[:, None]).float(), atol=1e-6,
                               rtol=1e-4)
    torch.testing.assert_close(codes[:, 2].abs(), torch.from_numpy(np.abs(weights[:, 2] - weights[:, 2].mean())
                                                                    / weights[:, 2].std(ddof=1)).float(), atol=1e-4, rtol=1e-3)
    lower_t, upper_t = torch.from_numpy(lower), torch.from_numpy(upper)
    by_mouth = basis.decode(torch.tensor([[3.0, -2.0, 0.0]])) - basis.decode(torch.zeros(1, 3))
    by_brows = basis.decode(torch.tensor([[0.0, 0.0, 3.0]])) - basis.decode(torch.zeros(1, 3))
    assert float(by_mouth[:, ~lower_t].abs().max()) == 0 and float(by_mouth[:, lower_t].abs().max()) > 1e-3
    assert float(by_brows[:, ~upper_t].abs().max()) == 0 and float(by_brows[:, upper_t].abs().max()) > 1e-3
    without = MotionBasis.fit(offsets.astype(np.float32), face, components=2)
    assert without.spoken == without.dim == 2
    assert not np.isin(upper.nonzero()[0], without.vertices.numpy()).any()  # no upper codes: the brows stay


def test_motion_net_leaves_unspoken_codes_at_zero():
    """The codes past `spoken` (the upper face's) are zero for any speech, before and after
    the calibration, and fitting ignores those targets."""
    g = torch.Generator().manual_seed(0)
    mel, visemes = torch.randn(30, 16, 80, generator=g), torch.rand(30, 15, generator=g)
    net = MotionNet(codes=5, window=4, spoken=3)
    codes = torch.randn(30, 5, generator=g)
    fit_motion_stage(net, mel, visemes, codes, torch.arange(30), steps=5)
    assert net.raw(mel, visemes).shape == (30, 5)
    assert float(net.predict(mel, visemes)[:, 3:].abs().max()) == 0
    assert float(net.predict(mel, visemes)[:, :3].abs().max()) > 0
    with pytest.raises(ValueError, match="spoken codes must be 1..5"):
        MotionNet(codes=5, spoken=6)


def test_closest_points_agree_with_a_dense_search():
    g = torch.Generator().manual_seed(0)
    corners = torch.randn(5, 3, 3, generator=g)
    points = torch.randn(200, 3, generator=g) * 2
    d2, bary = closest_on_triangles(points, corners.expand(200, -1, -1, -1))
    assert (bary >= -1e-6).all() and torch.allclose(bary.sum(-1), torch.ones(200, 5))
    # Dense barycentric grid on each triangle: nothing is closer than the returned point.
    u, v = torch.meshgrid(torch.linspace(0, 1, 101), torch.linspace(0, 1, 101), indexing="ij")
    keep = (u + v) <= 1
    grid = torch.stack([1 - u[keep] - v[keep], u[keep], v[keep]], -1)  # [G, 3]
    samples = torch.einsum("gk,fkd->fgd", grid, corners)  # [5, G, 3]
    dense = (points[:, None, None] - samples[None]).square().sum(-1).min(-1).values  # [200, 5]
    assert (d2 <= dense + 1e-6).all() and (dense - d2).max() < 1e-3


def test_skinning_opens_the_mouth_along_the_slit():
    """A point just above the closed slit goes with the upper lip, one just below with the
    lower lip, though the two lie a fraction of a millimetre apart."""
    face = canonical_face()
    face[UPPER_LIP] = [0.0, -0.030, 0.03]
    face[LOWER_LIP] = [0.0, -0.0302, 0.03]  # a closed mouth: the inner lips 0.2 mm apart
    tris = torch.tensor(face_triangles())
    assert not any({UPPER_LIP, LOWER_LIP} <= set(t) for t in tris.tolist())  # the slit is a hole
    offsets = torch.zeros(1, N_LANDMARKS, 3)
    offsets[0, UPPER_LIP, 1], offsets[0, LOWER_LIP, 1] = 0.002, -0.008  # open: lip up 2 mm, jaw down 8 mm
    verts = torch.from_numpy(face).float()
    points = torch.stack([verts[UPPER_LIP] + torch.tensor([0, 1e-5, 0]), verts[LOWER_LIP] - torch.tensor([0, 1e-5, 0])])
    binding = bind_to_mesh(points, verts, tris, falloff=0.015)
    moved = binding.skin(offsets)[0, :, 1]
    assert moved[0] > 0.0015 and moved[1] < -0.006, moved
    far = bind_to_mesh(verts[UPPER_LIP][None] + torch.tensor([[0, 0, -0.1]]), verts, tris, falloff=0.015)
    assert float(far.weight[0]) < 1e-3  # the skull far behind the lips (6 cm behind every vertex) does not follow them


def test_rig_rebinds_when_points_change():
    face = canonical_face()
    basis = MotionBasis.fit(np.zeros((4, N_LANDMARKS, 3), np.float32) + np.random.default_rng(0).normal(
        scale=1e-3, size=(4, N_LANDMARKS, 3)).astype(np.float32), face, components=2)
    rig = MotionRig(basis, torch.from_numpy(face), torch.tensor(face_triangles()))
    pts = torch.from_numpy(face[:10]).float()
    assert rig.offsets(0, pts, torch.zeros(1, 2)).shape == (1, 10, 3)
    assert rig.offsets(0, torch.cat([pts, pts]), torch.zeros(1, 2)).shape == (1, 20, 3)


def test_motion_net_learns_speech_dependent_motion_and_its_speed():
    """Codes follow the visemes (a closed mouth at P/B/M, open at vowels) one frame late and
    the log-mel loudness; held-out frames of the same kind get the right codes."""
    rng = np.random.default_rng(0)
    T = 240
    vis_id = rng.integers(0, 3, T).repeat(2)[:T]  # phones of 2 frames
    visemes = torch.from_numpy(np.eye(15, dtype=np.float32)[vis_id])
    loud = rng.normal(size=T).astype(np.float32)
    mel = torch.from_numpy(np.repeat(loud[:, None, None], 16, 1).repeat(80, 2))
    target = torch.zeros(T, 2)
    target[1:, 0] = torch.tensor([-1.5, 0.0, 1.5])[torch.from_numpy(vis_id[:-1])]  # one frame late
    target[:, 1] = torch.from_numpy(loud)
    torch.manual_seed(0)
    net = MotionNet(codes=2, window=8, dropout=0.0)
    rows = torch.arange(200)
    losses = fit_motion_net(net, mel, visemes, target[rows], rows, steps=300, noise=0.0)
    with torch.no_grad():
        pred = net(mel, visemes)
    held = slice(200, T)
    assert losses[-1] < 0.1 * losses[0]
    assert np.corrcoef(pred[held, 0], target[held, 0])[0, 1] > 0.9
    assert np.corrcoef(pred[held, 1], target[held, 1])[0, 1] > 0.9
    speed = (pred[held][1:] - pred[held][:-1]).abs().mean() / (target[held][1:] - target[held][:-1]).abs().mean()
    assert 0.7 < float(speed) < 1.3


def test_motion_stage_restores_the_range_lost_to_ambiguous_speech():
    """Half of each code is unpredictable from the speech: a squared-error fit predicts a
    shrunken code; the stage measures that out of sample and scales it back."""
    rng = np.random.default_rng(1)
    T = 300
    vis_id = rng.integers(0, 4, T)
    visemes = torch.from_numpy(np.eye(15, dtype=np.float32)[vis_id])
    mel = torch.zeros(T, 16, 80)
    codes = torch.from_numpy((np.array([-1.5, -0.5, 0.5, 1.5])[vis_id] + rng.normal(scale=1.5, size=T))
                             .astype(np.float32))[:, None]
    torch.manual_seed(0)
    net = MotionNet(codes=1, window=4, dropout=0.0)
    rows = torch.arange(250)
    result = fit_motion_stage(net, mel, visemes, codes[rows], rows, steps=200, noise=0.0, velocity_weight=0.0)
    raw, calibrated = net(mel, visemes).detach()[250:], net.predict(mel, visemes)[250:]
    assert result["gain"] > 1.15 and torch.all(net.gain == result["gain"])
    assert float(calibrated.std() / codes[250:].std()) > float(raw.std() / codes[250:].std()) + 0.1
    assert np.corrcoef(calibrated[:, 0], codes[250:, 0])[0, 1] > 0.6  # still in step with the speech


def test_bilabial_phones_close_the_lips_once_and_nothing_else():
    """Each bilabial event (a run of frames whose main viseme is P/B/M) closes the lips at
    one frame, from one before the run to one after it, where they are nearest closed; the
    gap narrows to the subject's closed gap there, a motion that did not go with the gap in
    the training frames stays, every other frame keeps its codes, and lips already closed
    stay as they are."""
    face = canonical_face()
    face[[UPPER_LIP, LOWER_LIP], 1] = -0.03
    rng = np.random.default_rng(4)
    T = 60
    gap = rng.uniform(0.0, 0.01, T)
    gap[9:12] = [0.008, 0.006, 0.009]  # open around the first event: it closes the frame before it
    gap[19:25] = [0.009, 0.008, 0.007, 0.005, 0.008, 0.009]  # ... and inside the second one
    jaw = rng.normal(scale=0.003, size=T)
    g0 = gap - gap.mean()
    jaw -= g0 * (jaw @ g0) / (g0 @ g0)  # a motion that did not go with the gap in these frames
    offsets = np.zeros((T, N_LANDMARKS, 3), np.float32)
    offsets[:, UPPER_LIP, 1], offsets[:, LOWER_LIP, 1] = gap / 2, -gap / 2
    lower = np.flatnonzero(face[:, 1] < 0)
    others = np.setdiff1d(lower, [UPPER_LIP, LOWER_LIP])
    offsets[:, others, 0] = jaw[:, None]
    basis = MotionBasis.fit(offsets, face, components=4)
    codes = basis.encode(torch.from_numpy(offsets))
    net = MotionNet(codes=basis.dim)
    net.set_closed_mouth(basis, codes, gap)
    closed_gap = gap[gap <= np.percentile(gap, 5) + 0.2 * np.ptp(np.percentile(gap, [5, 95]))].mean()

    visemes = torch.zeros(T, 15)
    visemes[:, 0] = 1
    runs = [(10, 10), (20, 23), (int(np.argmin(gap)), int(np.argmin(gap)))]  # the last where the lips are shut
    assert runs[2][0] > 25
    for start, end in runs:
        visemes[start:end + 1, 0] = 0.4
        visemes[start:end + 1, 1] = 0.6
    visemes[30, 1] = 0.3  # a bilabial share that is not the frame's main viseme: no event
    out = basis.decode(net.close_lips(codes, visemes)).numpy()
    after = out[:, UPPER_LIP, 1] - out[:, LOWER_LIP, 1]
    closed = []
    for start, end in runs:
        at = start - 1 + int(np.argmin(gap[start - 1:end + 2]))
        closed.append(at)
        if gap[at] > closed_gap:
            np.testing.assert_allclose(after[at], closed_gap, atol=2e-4)
            np.testing.assert_allclose(out[at, others, 0], jaw[at], atol=5e-4)
        else:
            assert after[at] == pytest.approx(gap[at], abs=1e-5)
    assert closed[:2] == [10, 22]  # the frame of the first phone; inside the longer run
    assert gap[10] > 2 * closed_gap and gap[22] > 2 * closed_gap
    untouched = np.setdiff1d(np.arange(T), closed)
    np.testing.assert_allclose(after[untouched], gap[untouched], atol=1e-5)


def test_the_gap_weight_makes_the_fit_follow_the_lip_gap():
    """Four codes from the speech: the lip gap (code 0) is a small, learnable share of the
    motion, the other three are large and half unpredictable. Weighing the gap's error makes
    the held-out gap follow the speech better than an equal weight does."""
    rng = np.random.default_rng(2)
    T = 300
    vis_id = rng.integers(0, 5, T).repeat(2)[:T]
    visemes = torch.from_numpy(np.eye(15, dtype=np.float32)[vis_id])
    mel = torch.from_numpy(rng.normal(size=(T, 16, 80)).astype(np.float32))
    codes = torch.from_numpy(np.stack([np.array([-1.0, -0.5, 0.0, 0.5, 1.0])[vis_id] * 0.3 + 0.1 * rng.normal(size=T),
                                       *(rng.normal(scale=3.0, size=(3, T)))], 1).astype(np.float32))
    codes[:, 1:] += torch.from_numpy(np.array([2.0, -1.0, 0.0, 1.0, -2.0])[vis_id, None].astype(np.float32))
    rows, held = torch.arange(240), torch.arange(240, T)
    corr = {}
    for weight in (0.0, 4.0):
        torch.manual_seed(0)
        net = MotionNet(codes=4, window=4, dropout=0.0)
        net.lip_axis.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        fit_motion_net(net, mel, visemes, codes[rows], rows, steps=150, noise=0.4, gap_weight=weight)
        with torch.no_grad():
            pred = net.raw(mel, visemes)[held, 0]
        corr[weight] = float(np.corrcoef(pred, codes[held, 0])[0, 1])
    assert corr[4.0] > corr[0.0] + 0.05, corr


def test_motion_fit_is_deterministic_and_leaves_the_global_generator_alone():
    T = 40
    mel, visemes, codes = torch.randn(T, 16, 80), torch.eye(15)[torch.arange(T) % 15], torch.randn(T, 3)
    nets = []
    for _ in range(2):
        torch.manual_seed(5)
        net = MotionNet(codes=3, window=4)  # dropout 0.2: draws random numbers while fitting
        state = torch.get_rng_state()
        fit_motion_net(net, mel, visemes, codes, torch.arange(T), steps=15, seed=3)
        assert torch.equal(torch.get_rng_state(), state)
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_raw_windows_is_raw_of_each_clip():
    torch.manual_seed(0)
    net = MotionNet(codes=8, visemes=15).eval()
    mel, vis = torch.randn(3, 13, 16, 80), torch.rand(3, 13, 15)
    with torch.no_grad():
        torch.testing.assert_close(net.raw_windows(mel, vis), torch.stack([net.raw(m, v) for m, v in zip(mel, vis)]))
