"""`avatar eval`: score a trained avatar on the held-out frames (the last 1/11 of the clip,
never trained on), and its lip sync on any speech.

Each held-out frame is rendered from its own camera, speech, eye signal and tracked upper-face codes, over its own
pixels outside the head mask and the background plate inside it (as ER-NeRF and
TalkingGaussian evaluate heads; the face metrics are what measure the avatar).
Metrics, written to AVATAR/eval.json:
  psnr/ssim        full image, and face (inside mediapipe's face oval of the real frame);
  psnr_face_upper, _middle, _lower   the face PSNR in three bands across the face
                   (FACE_REGIONS: forehead-brows-eyes, nose-cheeks, lips-jaw-chin), here,
                   in tracked_motion, train_fit (both rows) and novel_views: which part
                   of the face the error is in, the speech-driven lower face or the rest;
  lmd              mouth-landmark distance: mediapipe face mesh on the render and on the
                   real frame, mean distance of the 40 lip landmarks in pixels;
  lmd_static_mouth the same with the mouth's motion codes at zero (the clip's average
                   mouth; the upper face's kept);
  lipsync          recon/lipsync.py's measures, one row each for the real frames, the
                   avatar driven by speech, the avatar driven by each frame's tracked
                   motion (the renderer alone: it shows whether a mouth that does not
                   open is the speech-to-motion stage's fault or the renderer's), and the
                   static mouth;
  fps              rendering rate (deformation + rasterization) at the avatar's size;
  novel_views      (a rig's avatar trained with --holdout-cameras) the held-out cameras
                   at training moments: PSNR/SSIM full and in the face, per camera;
  live_speech      the held-out frames driven by the clip's own speech streamed through
                   the live path (recon/live.py: causal features and motion, 80 ms
                   look-ahead), beside the same frames driven offline: `face_cost_db`
                   is what speaking live costs in the face;
  driven_by        speech, or tracked_motion for a dataset filmed without sound (its
                   lipsync is then null);
  tracked_motion   the held-out frames' PSNR/SSIM/LMD driven by their own tracked motion
                   (lmd_frames: how many renders mediapipe tracked): what a perfect
                   speech-to-motion stage would give this renderer. Its gap to the
                   speech-driven figures is the speech-to-motion stage's; its gap to
                   train_fit's tracked_motion is the renderer's generalisation to unseen
                   frames. Null for an avatar driven by tracked motion anyway (no sound)
                   and for a dataset without tracked faces (no mesh rig);
  torso            (avatars with a torso branch) the held-out frames rendered with the 3D
                   torso over the plate instead of their own pixels: full-frame PSNR/SSIM
                   beside the frame-pixel figures above, PSNR inside the torso mask, the
                   silhouette IoU of head-or-torso alpha > 0.5 against the person mask, and
                   the seam where head meets torso (losses.boundary_seam, 8-bit levels),
                   with the 3D torso and with the frame's own pixels, and the alpha
                   there (losses.boundary_coverage) of head or torso, and of the head
                   alone (what lets the plate through with the frame's own pixels);
  train_fit        the same PSNR/SSIM/LMD and opening measures on training frames spaced
                   evenly through the clip, driven by their speech, and (`tracked_motion`)
                   PSNR/SSIM/LMD driven by their tracked motion: the renderer's own fit.
                   Held-out figures read as fit minus a generalisation gap.
AVATAR/eval_strip.png shows real | render | static-mouth render for a few frames, above
the inner-lip opening of every held-out frame: real, avatar, tracked motion, static mouth.

`avatar eval AVATAR --drive SPEECH` renders any speech through the dataset's cameras and
writes AVATAR/eval_drive_<name>.json: the same lipsync rows for that speech, the range
measured against the subject's real clip, beside the real clip's own row.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from avatar.dataset_format import CHIN, FACE_OVAL, LIPS, NASION, NOSE_BASE, NOSE_DORSUM, polygon_mask
from avatar.errors import AvatarError
from avatar.io import atomic_path, file_digest, write_json
from capture import FaceTracker

from .avatar_dir import CHECKPOINT, load_avatar
from .conditioning import speech_features, viseme_features
from .dataset import Dataset, behind_head, dataset_fingerprint
from .lipsync import agreement, lipsync_block, opening_of, syllable_envelope
from .live import stream_codes
from .losses import boundary_coverage, boundary_seam, psnr, ssim
from .method import HeadView, TrainedAvatar, coverage, torso_under
from .pose import correction_matrix
from .render import open_dataset, ping_pong


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()  # host: to the face tracker and the strip


def _score(pred: torch.Tensor, gt: torch.Tensor, face: dict[str, torch.Tensor] | None) -> dict:
    """PSNR/SSIM of a render [S, S, 3] against its frame, full and inside the face oval
    (with face_masks' bands: also the PSNR of each of FACE_REGIONS)."""
    row = {"psnr": psnr(pred, gt), "ssim": ssim(pred, gt)}
    if face is not None and face["face"].any():
        row.update(psnr_face=psnr(pred, gt, face["face"]), ssim_face=ssim(pred, gt, face["face"]))
        row.update({f"psnr_face_{r}": psnr(pred, gt, face[r]) if face[r].any() else None for r in FACE_REGIONS})
    return row


def _track(tracker: FaceTracker, img: np.ndarray) -> np.ndarray | None:
    """[478, 3] landmarks of the largest face in `img`, or None."""
    found = tracker(img)
    return found[0] if found else None


def _lmd(found: np.ndarray | None, gt: np.ndarray | None) -> float | None:
    """Mean distance of the 40 lip landmarks tracked on a render and on the real frame (pixels)."""
    return float(np.linalg.norm(found[LIPS, :2] - gt[LIPS, :2], axis=-1).mean()) if found is not None and gt is not None \
        else None


def _opening(found: np.ndarray | None) -> float:
    v = opening_of(found)
    return float("nan") if v is None else v


def render_frame(av: TrainedAvatar, ds: Dataset, i: int, under: torch.Tensor, code: torch.Tensor,
                 eye: torch.Tensor) -> tuple[torch.Tensor, HeadView]:
    """(dataset frame i's camera seeing the avatar with motion `code` [C] and `eye` [1] over
    `under` [S, S, 3], the head view it composited)."""
    view = av.render_head(av.deform(code[None], eye[None])[0], ds.viewmat(i), ds.intrinsics(i), ds.size)
    return view.over(under)[0], view


def eval_inputs(avatar: Path, dataset: Path) -> dict:
    """What an eval.json was scored from (a later run reuses it only if these match)."""
    return {"checkpoint": file_digest(Path(avatar) / CHECKPOINT), "dataset": dataset_fingerprint(dataset)}


FACE_REGIONS = ("upper", "middle", "lower")
"""The face oval cut across the face's own vertical axis (landmarks NASION to CHIN, so a
tilted head is cut along its face): `upper` above the nose's bridge just below the eyes
(forehead, brows, eyes), `lower` below the subnasale (lips, jaw, chin: what the motion
codes move), `middle` the nose and cheeks between. The cut is made in the image, so a
chin raised by more than about 12 degrees brings the lower eyelids into the middle band."""


def face_region_masks(lm: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """{"face": the face oval, and each of FACE_REGIONS}: [size, size] bool masks from one
    frame's landmarks [478, >=2] (pixels)."""
    face = polygon_mask((size, size), lm[list(FACE_OVAL)])
    top = lm[NASION, :2]
    axis = lm[CHIN, :2] - top
    axis = axis / max(float(np.linalg.norm(axis)), 1e-9)
    yy, xx = np.mgrid[0:size, 0:size]
    down = (xx - top[0]) * axis[0] + (yy - top[1]) * axis[1]  # pixels along the face, from between the eyes
    dorsum, base = (float((lm[k, :2] - top) @ axis) for k in (NOSE_DORSUM, NOSE_BASE))
    upper = face & (down < dorsum)
    lower = face & (down >= max(base, dorsum))  # a steep pitch can bring the two marks together
    return {"face": face, "upper": upper, "middle": face & ~upper & ~lower, "lower": lower}


def face_masks(ds: Dataset, i: int) -> dict[str, torch.Tensor] | None:
    """face_region_masks of frame i (the face PSNR's regions) on ds.device, or None without
    landmarks."""
    lm = ds.landmarks(i)
    return None if lm is None else {k: torch.from_numpy(m).to(ds.device)
                                    for k, m in face_region_masks(lm, ds.size).items()}


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(avatar: str | Path, progress: bool = True, strip_frames: int = 6, train_fit_frames: int = 18,
             pose_fit_frames: int = 12, novel_view_frames: int = 24, device: torch.device | str = "cpu") -> dict:
    """Score `avatar` (see the module docstring) and write eval.json and eval_strip.png.

    train_fit_frames: training frames, evenly spaced, also scored (`train_fit` in eval.json):
    how well the avatar fits what it was trained on, so the held-out figures read as fit
    minus a generalisation gap. 0 skips them.
    pose_fit_frames: held-out frames, evenly spaced, also scored after a pose-only fit to the
    frame (`pose_fit`); 0 skips it. novel_view_frames: per camera held out of training
    (`--holdout-cameras`), its views scored, evenly spaced over the training timesteps
    (`novel_views`). device: where the avatar renders (recon/device.py).
    """
    av = load_avatar(avatar, device)
    ds = open_dataset(av, av.size, required=True)
    holdout_cameras = list(av.meta.get("holdout_cameras", []))
    train_ids, held_out = ds.split(holdout_cameras=holdout_cameras)
    tracked = av.tracked_motion(ds)
    speaks = ds.has_speech and av.meta.get("speech", True)
    codes = av.dataset_motion(ds) if speaks else tracked  # filmed without sound: tracked motion drives
    fit_ids = train_ids[:: max(1, len(train_ids) // train_fit_frames)][:train_fit_frames] if train_fit_frames else []
    rows, fit_rows, strip = [], [], []
    t_render = 0.0

    with torch.no_grad(), FaceTracker(max_faces=1, video_mode=False) as tracker:
        frames = [(i, True) for i in held_out] + [(i, False) for i in fit_ids]
        for n, (i, is_held_out) in enumerate(tqdm(frames, desc="avatar eval", unit="frame", disable=not progress,
                                                  file=sys.stderr)):
            f = ds[i]
            under = behind_head(f, ds.plate(i))
            eye = torch.tensor([f.eye_openness], device=ds.device)
            t0 = time.perf_counter()
            pred, view = render_frame(av, ds, i, under, codes[f.frame_index], eye)
            if is_held_out:
                t_render += time.perf_counter() - t0
            face = face_masks(ds, i)
            gt_u8, pred_u8 = _to_uint8(f.image), _to_uint8(pred)
            gt_lm, pred_lm = _track(tracker, gt_u8), _track(tracker, pred_u8)
            row = {"frame": i, **_score(pred, f.image, face), "lmd": _lmd(pred_lm, gt_lm),
                   "opening_real": _opening(gt_lm), "opening": _opening(pred_lm)}
            if is_held_out and av.has_torso:
                row["torso"] = torso_scores(av, ds, i, pred, view)
            if not is_held_out:
                if tracked is not None:  # the renderer's own fit: the motion it was trained on
                    fit_pred = render_frame(av, ds, i, under, tracked[f.frame_index], eye)[0]
                    row["tracked_motion"] = {**_score(fit_pred, f.image, face),
                                             "lmd": _lmd(_track(tracker, _to_uint8(fit_pred)), gt_lm)}
                fit_rows.append(row)
                continue
            static = render_frame(av, ds, i, under, av.static_mouth(codes[f.frame_index]), eye)[0]
            static_u8 = _to_uint8(static)
            static_lm = _track(tracker, static_u8)
            row["lmd_static_mouth"] = _lmd(static_lm, gt_lm)
            row["opening_static_mouth"] = _opening(static_lm)
            if tracked is not None and not speaks:  # tracked motion drove the render itself
                row["opening_tracked_motion"] = row["opening"]
            elif tracked is not None:  # what a perfect speech-to-motion stage would give this renderer
                tracked_pred = render_frame(av, ds, i, under, tracked[f.frame_index], eye)[0]
                tracked_lm = _track(tracker, _to_uint8(tracked_pred))
                row["opening_tracked_motion"] = _opening(tracked_lm)
                row["tracked_motion"] = {**_score(tracked_pred, f.image, face), "lmd": _lmd(tracked_lm, gt_lm)}
            rows.append(row)
            if n % max(1, len(held_out) // strip_frames) == 0 and len(strip) < strip_frames:
                strip.append(np.concatenate([gt_u8, pred_u8, static_u8], axis=0))
    if not rows:
        raise AvatarError(ds.root, "has no held-out frames to evaluate")

    lmd_frames = [r for r in rows if r["lmd"] is not None and r["lmd_static_mouth"] is not None]
    result = {
        "format": "avatar-eval/3",
        "avatar": str(Path(avatar).resolve()), "dataset": str(ds.root), "inputs": eval_inputs(av.root, ds.root),
        "held_out_frames": [r["frame"] for r in rows],
        "size": ds.size,
        "psnr": _mean(rows, "psnr"), "ssim": _mean(rows, "ssim"),
        "psnr_face": _mean(rows, "psnr_face"), "ssim_face": _mean(rows, "ssim_face"),
        **{f"psnr_face_{k}": _mean(rows, f"psnr_face_{k}") for k in FACE_REGIONS},
        "lmd": float(np.mean([r["lmd"] for r in lmd_frames])) if lmd_frames else None,
        "lmd_static_mouth": float(np.mean([r["lmd_static_mouth"] for r in lmd_frames])) if lmd_frames else None,
        "lmd_frames": len(lmd_frames),
        "driven_by": "speech" if speaks else "tracked_motion",
        "tracked_motion": tracked_scores([r["tracked_motion"] for r in rows]) if "tracked_motion" in rows[0] else None,
        "lipsync": held_out_lipsync(ds, [r for r in rows if ds.camera_of[r["frame"]] == ds.camera_of[rows[0]["frame"]]],
                                    av.fps) if speaks else None,
        "novel_views": novel_view_scores(av, ds, holdout_cameras, *((tracked, "tracked_motion") if tracked is not None
                                                                   else (codes, "speech")),
                                         novel_view_frames, progress) if holdout_cameras else None,
        "pose_fit": held_out_pose_fit(av, ds, held_out[:: max(1, len(held_out) // pose_fit_frames)][:pose_fit_frames],
                                      codes) if pose_fit_frames else None,
        "live_speech": live_speech_scores(av, ds, rows) if speaks else None,
        "fps": len(rows) / t_render,
        "torso": {k: _mean([r["torso"] for r in rows], k) for k in TORSO_KEYS} if "torso" in rows[0] else None,
        "per_frame": rows,
        "train_fit": train_fit(fit_ids, fit_rows) if fit_rows else None,
    }
    root = Path(avatar)
    write_json(root / "eval.json", result)
    images = np.concatenate(strip, axis=1)
    chart = opening_chart(rows, result["lipsync"] or {}, images.shape[1])
    with atomic_path(root / "eval_strip.png") as tmp:
        cv2.imwrite(str(tmp), cv2.cvtColor(np.concatenate([images, chart], axis=0), cv2.COLOR_RGB2BGR))
    return result


def live_speech_scores(av: TrainedAvatar, ds: Dataset, rows: list[dict], lookahead_s: float = 0.08) -> dict | None:
    """The held-out frames driven by the clip's own speech streamed through the live path
    (recon/live.py: causal features and motion, `lookahead_s`, the clip's features as the
    normalisation's prior, as `avatar view` and `avatar speak` stream it), against the same
    frames driven offline (`rows`): what speaking live costs in the image. None when the
    dataset keeps no audio file; {"skipped": why} without the audio stack (held-out scoring
    needs none)."""
    if not ds.meta.get("audio") or not (ds.root / ds.meta["audio"]).is_file():
        return None
    try:
        from capture import load_audio  # av, soundfile; and the stream, pocketsphinx

        codes, motion = stream_codes(av, load_audio(ds.root / ds.meta["audio"]), lookahead_s, ds.features["mel"])
    except ImportError as exc:
        return {"skipped": f"live speech needs the audio stack, and {exc.name} is not installed"}
    live = []
    with torch.no_grad():
        for r in rows:
            i = r["frame"]
            f = ds[i]
            pred = render_frame(av, ds, i, behind_head(f, ds.plate(i)), codes[min(f.frame_index, len(codes) - 1)],
                               torch.tensor([f.eye_openness], device=ds.device))[0]
            live.append(_score(pred, f.image, face_masks(ds, i)))
    out = {"lookahead_ms": round(lookahead_s * 1000, 1), "motion": motion, "frames": len(live), "psnr": _mean(live, "psnr"),
           "psnr_face": _mean(live, "psnr_face"), "psnr_offline": _mean(rows, "psnr"),
           "psnr_face_offline": _mean(rows, "psnr_face")}
    out["face_cost_db"] = out["psnr_face_offline"] - out["psnr_face"]
    return out


def novel_view_scores(av: TrainedAvatar, ds: Dataset, cameras: list[str], codes: torch.Tensor, driven_by: str,
                      per_camera: int, progress: bool) -> dict:
    """The cameras held out of training, seen at moments the avatar was trained on, each
    driven by its timestep's motion `codes` [rows, C] (`driven_by` says which: tracked,
    where the avatar has them, is the renderer's own input, so the figures measure the
    views, not the speech): PSNR/SSIM full and in the face, per camera and over all."""
    ids = ds.novel_views(cameras)
    out: dict = {"driven_by": driven_by, "cameras": {}}
    rows_all = []
    with torch.no_grad():
        for name in cameras:
            mine = [i for i in ids if ds.cameras[ds.camera_of[i]].name == name]
            picks = [mine[k] for k in np.linspace(0, len(mine) - 1, min(per_camera, len(mine))).round().astype(int)]
            rows = []
            for i in tqdm(picks, desc=f"novel view {name}", unit="frame", disable=not progress, file=sys.stderr):
                f = ds[i]
                pred = render_frame(av, ds, i, behind_head(f, ds.plate(i)), codes[f.frame_index],
                                    torch.tensor([f.eye_openness], device=ds.device))[0]
                rows.append({"frame": i, **_score(pred, f.image, face_masks(ds, i))})
            out["cameras"][name] = {"frames": len(rows), **{k: _mean(rows, k) for k in SCORE_KEYS}}
            rows_all += rows
    return {**out, **{k: _mean(rows_all, k) for k in SCORE_KEYS}}


SCORE_KEYS = ("psnr", "ssim", "psnr_face", "ssim_face", *(f"psnr_face_{r}" for r in FACE_REGIONS))
SCORE_LMD_KEYS = (*SCORE_KEYS, "lmd")
TORSO_KEYS = ("psnr", "ssim", "psnr_torso_region", "silhouette_iou", "seam", "seam_frame_pixels", "neck_coverage",
              "neck_coverage_head")


def torso_scores(av: TrainedAvatar, ds: Dataset, i: int, over_frame: torch.Tensor, view: HeadView) -> dict:
    """Frame i with the 3D torso over the plate (see the module docstring); `over_frame` is
    its render over its own pixels, and `view` its head, laid over the torso here."""
    f = ds[i]
    torso = av.torso_layer(ds.viewmat(i), ds.intrinsics(i), ds.size, f)
    image, head_alpha = view.over(torso_under(torso, ds.plate(i)))
    covered = coverage(head_alpha, torso.alpha)[..., 0]
    alpha = covered > 0.5
    person, region, head = f.masks["person"], f.masks["torso"], f.masks["head"]
    union = (alpha | person).sum()
    return {"psnr": psnr(image, f.image), "ssim": ssim(image, f.image),
            "psnr_torso_region": psnr(image, f.image, region) if region.any() else None,
            "silhouette_iou": float((alpha & person).sum() / union) if union else None,
            "seam": boundary_seam(image, f.image, head, region),
            "seam_frame_pixels": boundary_seam(over_frame, f.image, head, region),
            "neck_coverage": boundary_coverage(covered, head, region),
            "neck_coverage_head": boundary_coverage(head_alpha[..., 0], head, region)}


OPENING_CURVES = (("real", "opening_real", (255, 255, 255)), ("avatar", "opening", (80, 220, 80)),
                  ("tracked_motion", "opening_tracked_motion", (240, 200, 40)),
                  ("static_mouth", "opening_static_mouth", (230, 70, 70)))


def opening_chart(rows: list[dict], lipsync: dict, width: int, height: int = 160) -> np.ndarray:
    """[height, width, 3] uint8: the inner-lip opening over the held-out frames, one curve per
    lipsync row, labelled with its correlation and range against the real mouth."""
    chart = np.full((height, width, 3), 24, np.uint8)
    curves = [(name, np.array([r.get(key, np.nan) for r in rows], np.float64), colour)
              for name, key, colour in OPENING_CURVES if key in rows[0]]
    values = np.concatenate([c for _, c, _ in curves])
    lo, hi = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 1.0)
    top, bottom = 16 * len(curves) + 6, height - 6
    x = np.linspace(4, width - 5, len(rows))
    for k, (name, curve, colour) in enumerate(curves):
        y = bottom - (curve - lo) / max(hi - lo, 1e-9) * (bottom - top)
        ok = np.isfinite(y)
        pts = np.stack([x[ok], y[ok]], 1).round().astype(np.int32)
        if len(pts) > 1:
            cv2.polylines(chart, [pts], False, colour, 1, cv2.LINE_AA)
        row = lipsync.get(name, {})
        corr, spread = row.get("opening_corr"), row.get("opening_range_ratio")
        label = f"{name.replace('_', ' ')}: corr {'n/a' if corr is None else f'{corr:.2f}'}, range " \
                f"{'n/a' if spread is None else f'{spread:.2f}'}"
        cv2.putText(chart, label, (6, 13 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return chart


def held_out_pose_fit(av: TrainedAvatar, ds: Dataset, frames: list[int], codes: torch.Tensor, steps: int = 25,
                      lr: float = 3e-3) -> dict:
    """Face PSNR of held-out frames with capture's pose and after a pose-only fit: a rigid
    correction of the head (recon/pose.py) fitted to the frame by Adam on the head's L1,
    the avatar frozen. How much of the held-out error is pose, not appearance. The fit
    runs at half the frame's size (a quarter of the rays: a radiance field's backward pass
    is most of its evaluation otherwise); the scores are at full size."""
    rows = []
    for i in frames:
        f = ds[i]
        under, eye = behind_head(f, ds.plate(i)), torch.tensor([f.eye_openness], device=ds.device)
        face = (face_masks(ds, i) or {}).get("face")
        head = f.masks["head"]
        with torch.no_grad():
            pose = av.deform(codes[f.frame_index][None], eye[None])[0]

        def render(delta: torch.Tensor, K: torch.Tensor, size: int, behind: torch.Tensor) -> torch.Tensor:
            viewmat = ds.viewmat(i) @ correction_matrix(delta)
            return av.render_head(pose, viewmat, K, size).over(behind)[0]

        K_half = ds.intrinsics(i).clone()
        K_half[:2] *= 0.5  # pixel (u, v) of the frame covers (u/2, v/2) of the half-size image
        under_half, image_half = half_size(under), half_size(f.image)
        head_half = half_size(head[..., None].float())[..., 0] > 0.5
        delta = torch.zeros(6, requires_grad=True, device=ds.device)
        opt = torch.optim.Adam([delta], lr=lr)
        for _ in range(steps):
            loss = (render(delta, K_half, ds.size // 2, under_half) - image_half).abs().mean(-1)[head_half].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            K = ds.intrinsics(i)
            before, after = render(torch.zeros_like(delta), K, ds.size, under), render(delta.detach(), K, ds.size, under)
        mask = face if face is not None and face.any() else head
        rows.append({"frame": i, "psnr_face_capture_pose": psnr(before, f.image, mask),
                     "psnr_face_fitted_pose": psnr(after, f.image, mask),
                     "rotation_deg": float(delta[:3].detach().norm()) * 57.2958,
                     "translation_mm": float(delta[3:].detach().norm()) * 10})
    keys = ("psnr_face_capture_pose", "psnr_face_fitted_pose", "rotation_deg", "translation_mm")
    return {"frames": frames, **{k: _mean(rows, k) for k in keys}, "per_frame": rows}


def drive_result_path(avatar: str | Path, speech: str | Path, camera: str | None = None) -> Path:
    """Where evaluate_drive writes its result."""
    return Path(avatar) / f"eval_drive_{Path(speech).stem}{'' if camera is None else '_' + camera}.json"


def half_size(image: torch.Tensor) -> torch.Tensor:
    """[H, W, C] -> [H // 2, W // 2, C]: the mean of each 2x2 block."""
    return torch.nn.functional.avg_pool2d(image.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)


def tracked_scores(rows: list[dict]) -> dict:
    """Mean scores of frames driven by their tracked motion; `lmd_frames` counts those whose
    render mediapipe tracked (the speech-driven LMD has its own count)."""
    return {**{k: _mean(rows, k) for k in SCORE_LMD_KEYS}, "lmd_frames": sum(r["lmd"] is not None for r in rows)}


def train_fit(frames: list[int], rows: list[dict]) -> dict:
    """The training frames' scores: driven by their speech, as held-out frames are, and (with
    a mesh rig) by their tracked motion, which is what the renderer was fitted to."""
    out = {"frames": frames, **{k: _mean(rows, k) for k in SCORE_LMD_KEYS},
           **agreement([r["opening"] for r in rows], [r["opening_real"] for r in rows])}
    if "tracked_motion" in rows[0]:
        out["tracked_motion"] = tracked_scores([r["tracked_motion"] for r in rows])
    return {**out, "per_frame": rows}


def held_out_lipsync(ds: Dataset, rows: list[dict], fps: float) -> dict:
    """The lipsync rows over the held-out frames (consecutive frames of the clip's end)."""
    feature_rows = [int(ds.frames[r["frame"]]["frame_index"]) for r in rows]
    visemes = viseme_features(ds.features).numpy()[feature_rows]  # host: features are made there
    envelope = syllable_envelope(ds.features["mel"][feature_rows])
    real = np.array([r["opening_real"] for r in rows], np.float64)
    out = {"real": lipsync_block(real, visemes, envelope, fps, real)}
    for name, key in (("avatar", "opening"), ("tracked_motion", "opening_tracked_motion"),
                      ("static_mouth", "opening_static_mouth")):
        if key in rows[0]:
            out[name] = lipsync_block(np.array([r[key] for r in rows], np.float64), visemes, envelope, fps, real,
                                      real=real)
    return out


def evaluate_drive(avatar: str | Path, speech: str | Path, progress: bool = True, real_frames: int = 500,
                   device: torch.device | str = "cpu", camera: str | None = None) -> dict:
    """Lip sync of `avatar` driven by any speech file: rendered through one camera's views
    of the dataset (replayed back and forth, as `avatar render --camera dataset`), tracked,
    and measured against the speech and the subject's real mouth in that camera (its first
    `real_frames` frames). camera: a rig's camera by name (None: the first). Writes
    AVATAR/eval_drive_<speech name>.json (..._<camera>.json for a named camera) and returns
    it. device: where the avatar renders (recon/device.py)."""
    av = load_avatar(avatar, device)
    ds = open_dataset(av, av.size, required=True)
    _, feats = speech_features(Path(speech), av.fps)
    codes = av.speech_motion(feats)
    visemes = viseme_features(feats).numpy()  # host: features are made there
    replay_camera = ds.camera_index(camera)
    replay = ds.views_of(replay_camera)  # one camera's clip
    n_real = min(len(replay), real_frames)
    opened = {"avatar": [], "static_mouth": [], "real": []}
    with torch.no_grad(), FaceTracker(max_faces=1, video_mode=False) as tracker:
        bar = tqdm(total=len(codes) + n_real, desc="avatar eval --drive", unit="frame", disable=not progress,
                   file=sys.stderr)
        for i in replay[:n_real]:
            opened["real"].append(_opening(_track(tracker, _to_uint8(ds[i].image))))
            bar.update(1)
        for k in range(len(codes)):
            i = replay[ping_pong(k, len(replay))]
            f = ds[i]
            under, eye = behind_head(f, ds.plate(i)), torch.tensor([1.0], device=ds.device)
            for name, code in (("avatar", codes[k]), ("static_mouth", av.static_mouth(codes[k]))):
                img = render_frame(av, ds, i, under, code, eye)[0]
                opened[name].append(_opening(_track(tracker, _to_uint8(img))))
            bar.update(1)
        bar.close()
    real = np.array(opened["real"])
    real_rows = [int(ds.frames[i]["frame_index"]) for i in replay[:n_real]]
    envelope = syllable_envelope(feats["mel"])
    result = {
        "format": "avatar-eval-drive/1", "avatar": str(Path(avatar).resolve()), "speech": str(Path(speech).resolve()),
        "camera": ds.cameras[replay_camera].name, "frames": len(codes), "fps": av.fps,
        "lipsync": {
            "real": lipsync_block(real, viseme_features(ds.features).numpy()[real_rows],  # host: features
                                  syllable_envelope(ds.features["mel"][real_rows]), av.fps, real),
            **{name: lipsync_block(np.array(opened[name]), visemes, envelope, av.fps, real)
               for name in ("avatar", "static_mouth")},
        },
    }
    write_json(drive_result_path(avatar, speech, camera), result)
    return result
