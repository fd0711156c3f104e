"""The ``avatar`` command: one CLI, one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import __version__


def _capture(args: argparse.Namespace) -> int:
    from avatar.errors import AvatarError
    from capture.config import CaptureConfig

    if args.from_ernerf is not None:
        from capture.ernerf import import_ernerf

        out = import_ernerf(Path(args.from_ernerf), Path(args.out), force=args.force)
    elif args.tile or args.calib or (args.video is not None and Path(args.video).is_dir()):
        from capture.multiview import RigCaptureConfig, run_rig_capture

        for flag, given in (("--photometric", args.photometric), ("--audio-features", args.audio_features)):
            if given:
                raise AvatarError(Path(args.video), f"{flag} is for one camera's video, not a rig",
                                  f"capture the rig without {flag}")
        cfg = RigCaptureConfig(rig=Path(args.video), out=Path(args.out), calib=args.calib and Path(args.calib),
                               tiles=args.tile or [], audio=args.audio and Path(args.audio), fps=args.fps,
                               size=args.size, force=args.force)
        try:
            cfg.check()
        except ValueError as exc:
            raise AvatarError(None, f"capture setting {exc}") from exc
        out = run_rig_capture(cfg, progress=sys.stderr.isatty())
    else:
        if args.video is None:
            raise SystemExit("avatar capture: give a VIDEO, or --from-ernerf DIR")
        from capture.pipeline import run_capture

        cfg = CaptureConfig(video=Path(args.video), out=Path(args.out), audio=args.audio and Path(args.audio),
                            audio_features=[Path(p) for p in args.audio_features], fps=args.fps, size=args.size,
                            photometric=args.photometric, force=args.force)
        try:
            cfg.check()
        except ValueError as exc:
            raise AvatarError(None, f"capture setting {exc}") from exc
        out = run_capture(cfg)
    print(f"dataset: {out}\n  report:  {out / 'capture_report.json'}\n  preview: {out / 'preview.png'}")
    return 0


def _tile(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not X,Y,W,H (four integers, pixels)") from None
    return x, y, w, h


def _calibrate(args: argparse.Namespace) -> int:
    from capture.calibration import calibrate_rig, save_calibration

    calib = calibrate_rig(args.rig, args.method, board=args.board, given=getattr(args, "from"),
                          intrinsics=args.intrinsics, tiles=args.tile,
                          same_lens=args.same_lens, progress=sys.stderr.isatty())
    save_calibration(args.out, calib)
    print(f"{len(calib.cameras)} cameras ({calib.method}: {calib.source}); translations in {calib.units}")
    print(f"  {'camera':<16} {'size':>10} {'fx':>8} {'fy':>8} {'median px':>9} {'p90 px':>7} {'views':>5}")
    for c in calib.cameras:
        r = c.reprojection or {}
        print(f"  {c.name:<16} {f'{c.width}x{c.height}':>10} {c.K[0, 0]:8.1f} {c.K[1, 1]:8.1f} "
              f"{_fmt(r.get('median_px'), '9.2f'):>9} {_fmt(r.get('p90_px'), '7.2f'):>7} {_fmt(r.get('views'), '5d'):>5}")
        lens = r.get("intrinsics") or {}
        if lens.get("focal_uncertain"):
            print(f"    {c.name}: focal length uncertain (standard error {100 * lens['focal_relative_sd']:.1f} %): film the "
                  "board closer and farther, tilted, across the whole frame, or pass --intrinsics")
    if "principal_points" in calib.report:
        print(f"  principal points: {calib.report['principal_points']}")
    print(f"calibration: {args.out}")
    return 0


def _device(args: argparse.Namespace):
    """The torch device of --device (recon/device.py); a named error when it cannot run here."""
    from avatar.errors import AvatarError
    from recon.device import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as exc:
        raise AvatarError(None, f"--device: {exc}") from exc


def _rank_device(args: argparse.Namespace):
    """The device of this training process: --device, or with several processes on GPUs,
    one GPU each (cuda:LOCAL_RANK)."""
    import torch

    from avatar.errors import AvatarError
    from recon import distributed

    if args.nproc < 1:
        raise AvatarError(None, f"--nproc {args.nproc}: at least one process trains")
    if args.nproc > 1 and distributed.launched():
        raise AvatarError(None, "--nproc starts processes itself, but this one was started as a rank (torchrun)",
                          "leave --nproc out under torchrun; give torchrun --nproc-per-node")
    device = _device(args)
    several = args.nproc > 1 or distributed.launched()
    if not several or device.type != "cuda":
        return device
    if ":" in args.device:
        raise AvatarError(None, f"--device {args.device} names one GPU, but each of several processes takes its own",
                          "use --device cuda (or auto); choose the GPUs with CUDA_VISIBLE_DEVICES")
    if args.nproc > torch.cuda.device_count():
        raise AvatarError(None, f"--nproc {args.nproc} on CUDA needs a GPU per process; this machine has "
                          f"{torch.cuda.device_count()}", "start as many processes as GPUs, or use --device cpu")
    return torch.device("cuda", distributed.local_rank())


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without its --nproc N (or --nproc=N)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _train(args: argparse.Namespace) -> int:
    from avatar.errors import AvatarError
    from recon import distributed
    from recon.engine import train
    from recon.method import DEFAULT_METHOD, config_from_file, method_class

    overrides = {k: v for k, v in dict(iterations=args.iterations, size=args.size, seed=args.seed,
                                       batch_size=args.batch_size, backend=args.backend).items() if v is not None}
    try:
        method = method_class(args.method or DEFAULT_METHOD)
    except ValueError as exc:
        raise AvatarError(None, f"--method: {exc}") from exc
    cfg = None  # the default preset, or when resuming, the checkpoint's own settings (overrides over either)
    if args.config:
        cfg, overrides = config_from_file(Path(args.config), method.name, args.preset, **overrides), {}
    else:
        try:
            checked = method.config(args.preset, **overrides)  # types and ranges of what was given
        except ValueError as exc:
            raise AvatarError(None, f"training setting {exc}") from exc
        if args.preset:
            cfg, overrides = checked, {}
    holdout = [n for n in args.holdout_cameras.split(",") if n] if args.holdout_cameras is not None else None
    device = _rank_device(args)
    if args.nproc > 1:  # this process only launches the ranks, which run this command without --nproc
        distributed.launch(args.nproc, _without_nproc(args.argv), Path(args.out), device.type == "cuda")
        return 0
    ranks = distributed.join(device)
    try:
        out = train(args.dataset, args.out, cfg, resume=args.resume, force=args.force, overrides=overrides,
                    device=device, method=args.method, holdout_cameras=holdout)
    finally:
        distributed.leave()
    if not ranks.first:
        return 0
    print(f"avatar: {out}\n  metrics: {out / 'metrics.jsonl'}")
    if (out / "canonical.ply").is_file():
        print(f"  canonical Gaussians: {out / 'canonical.ply'}")
    if (out / "live_motion.safetensors").is_file():
        print(f"  live motion net: {out / 'live_motion.safetensors'} (`avatar speak`, the studio's microphone)")
    return 0


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _lipsync_table(rows: dict) -> str:
    """The lipsync rows of eval.json as aligned lines (real video and static mouth beside the avatar)."""
    lines = [f"  {'lip sync':<16} {'corr':>6} {'range':>6} {'bilabial':>8} {'open-vowel':>10} {'A/V ms':>7} {'A/V r':>6}"]
    for name, b in rows.items():
        lines.append(f"  {name.replace('_', ' '):<16} {_fmt(b.get('opening_corr'), '6.2f'):>6} "
                     f"{_fmt(b.get('opening_range_ratio'), '6.2f'):>6} {_fmt(b.get('bilabial_closure'), '8.2f'):>8} "
                     f"{_fmt(b.get('open_vowel_opening'), '10.3f'):>10} {_fmt(b.get('av_offset_ms'), '7.0f'):>7} "
                     f"{_fmt(b.get('av_peak_corr'), '6.2f'):>6}")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from avatar.errors import AvatarError

    if args.camera is not None and not args.drive:
        raise AvatarError(None, "--camera picks the camera of --drive",
                          "add --drive SPEECH, or leave --camera out (held-out frames are scored in every camera)")
    if args.drive:
        from recon.evaluate import drive_result_path, evaluate_drive

        for speech in args.drive:
            r = evaluate_drive(args.avatar, speech, device=_device(args), camera=args.camera)
            print(f"driven by {speech}: {r['frames']} frames through camera {r['camera']}\n"
                  f"{_lipsync_table(r['lipsync'])}\nresults: {drive_result_path(args.avatar, speech, args.camera)}")
        return 0
    from recon.evaluate import FACE_REGIONS, evaluate

    r = evaluate(args.avatar, device=_device(args))
    fmt = _fmt

    def regions(scores: dict) -> str:
        bands = [scores.get(f"psnr_face_{k}") for k in FACE_REGIONS]
        return "" if all(b is None for b in bands) else \
            f" ({' / '.join(FACE_REGIONS)} face {' / '.join(fmt(b, '.2f') for b in bands)} dB)"
    p = r.get("pose_fit")
    pose = (f"\n  pose-only fit to {len(p['frames'])} frames: face PSNR {fmt(p['psnr_face_capture_pose'], '.2f')} dB with "
            f"capture's poses -> {fmt(p['psnr_face_fitted_pose'], '.2f')} dB fitted "
            f"({fmt(p['rotation_deg'], '.2f')} deg, {fmt(p['translation_mm'], '.1f')} mm)" if p else "")
    t = r["train_fit"]
    fit = (f"\ntraining frames (fit): {len(t['frames'])}, PSNR face {fmt(t['psnr_face'], '.2f')} dB, "
           f"LMD {fmt(t['lmd'], '.2f')} px, opening corr {fmt(t['opening_corr'], '.2f')}, "
           f"range {fmt(t['opening_range_ratio'], '.2f')}" if t else "")
    if t and t.get("tracked_motion"):
        m = t["tracked_motion"]
        fit += (f"\n  driven by their tracked motion (the renderer's fit): PSNR full {fmt(m['psnr'], '.2f')} dB, "
                f"face {fmt(m['psnr_face'], '.2f')} dB{regions(m)}, LMD {fmt(m['lmd'], '.2f')} px")
    m = r.get("tracked_motion")
    tracked = (f"\n  driven by their tracked motion (a perfect speech -> motion stage): PSNR full "
               f"{fmt(m['psnr'], '.2f')} dB, face {fmt(m['psnr_face'], '.2f')} dB{regions(m)}, LMD "
               f"{fmt(m['lmd'], '.2f')} px" if m else "")
    b = r.get("torso")
    torso = (f"\n  with the 3D torso over the plate: PSNR full {fmt(b['psnr'], '.2f')} dB (torso region "
             f"{fmt(b['psnr_torso_region'], '.2f')} dB), silhouette IoU {fmt(b['silhouette_iou'], '.3f')}, "
             f"neck seam {fmt(b['seam'], '.1f')} levels (frame pixels {fmt(b['seam_frame_pixels'], '.1f')})"
             if b else "")
    nv = r.get("novel_views")
    novel = "".join(f"\n  camera {name}: {c['frames']} views, PSNR full {fmt(c['psnr'], '.2f')} dB, face "
                    f"{fmt(c['psnr_face'], '.2f')} dB, SSIM {fmt(c['ssim'], '.4f')}"
                    for name, c in (nv or {}).get("cameras", {}).items())
    novel = f"\nnovel views (cameras held out of training, at training moments, driven by {nv['driven_by']}):" \
            f"{novel}" if nv else ""
    ls = r.get("live_speech")
    live = (f"\n  live speech ({ls['lookahead_ms']:.0f} ms look-ahead, causal): face PSNR {fmt(ls['psnr_face'], '.2f')} "
            f"dB against {fmt(ls['psnr_face_offline'], '.2f')} dB offline" if ls and "skipped" not in ls else "")
    lipsync = _lipsync_table(r["lipsync"]) if r.get("lipsync") else \
        f"  lip sync: not measured (the dataset has no sound; frames driven by {r['driven_by'].replace('_', ' ')})"
    print(f"""held-out frames: {len(r['held_out_frames'])} at {r['size']}x{r['size']}
  PSNR  full {fmt(r['psnr'], '.2f')} dB, face {fmt(r['psnr_face'], '.2f')} dB{regions(r)} (the frame's own pixels around the head){torso}
  SSIM  full {fmt(r['ssim'], '.4f')}, face {fmt(r['ssim_face'], '.4f')}
  LMD   {fmt(r['lmd'], '.2f')} px (static-mouth baseline {fmt(r['lmd_static_mouth'], '.2f')} px, {r['lmd_frames']} frames)
  FPS   {r['fps']:.1f}{tracked}{pose}{live}
{lipsync}{fit}{novel}
results: {args.avatar}/eval.json, strip: {args.avatar}/eval_strip.png""")
    return 0


def _render(args: argparse.Namespace) -> int:
    from recon.render import render_video

    r = render_video(args.avatar, args.audio, args.out, camera=args.camera, size=args.size, torso=args.torso,
                     device=_device(args))
    print(f"video: {r['video']} ({r['frames']} frames, {r['seconds']:.2f} s; audio {r['audio_seconds']:.2f} s)")
    return 0


def _speak(args: argparse.Namespace) -> int:
    import json

    from avatar.errors import AvatarError
    from recon.live import STAGES, speak

    if args.lookahead_ms < 0 or args.chunk_ms <= 0:
        raise AvatarError(None, "--lookahead-ms must be >= 0 and --chunk-ms > 0")
    r = speak(args.avatar, args.audio, realtime=args.realtime, lookahead_s=args.lookahead_ms / 1000,
              size=args.size, chunk_ms=args.chunk_ms, out=args.out, device=_device(args))
    pace = "in real time" if r["realtime"] else "as fast as it renders"
    print(f"live speech {pace}: {r['rendered']} of {r['frames']} frames rendered ({r['skipped']} skipped), "
          f"{r['sustained_fps']:.1f} FPS sustained, {r['size']} px, look-ahead {r['lookahead_ms']:.0f} ms")
    print(f"  motion: {r['motion']}")
    print(f"  {'latency (ms)':<12} {'median':>7} {'p90':>7}")
    for stage in ("total", *STAGES):
        print(f"  {stage:<12} {r['latency_ms'][stage]['median']:>7.1f} {r['latency_ms'][stage]['p90']:>7.1f}")
    if r.get("video"):
        print(f"  video: {r['video']}")
    if args.json:
        print(json.dumps(r))
    return 0


def _export(args: argparse.Namespace) -> int:
    from recon.export import export

    paths = export(args.avatar, ply=args.ply, frame=args.frame, audio=args.audio, frames_dir=args.frames,
                   device=_device(args), mesh=args.mesh, mesh_resolution=args.mesh_resolution)
    print(f"wrote {paths[0]}" if len(paths) == 1 else f"wrote {len(paths)} files to {paths[0].parent}")
    return 0


def _view(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path / "transforms.json").is_file():
        from viewer.dataset_view import run_dataset_viewer

        return run_dataset_viewer(path, args.host, args.port)
    from recon.avatar_dir import CHECKPOINT

    if (path / CHECKPOINT).is_file():
        from avatar.errors import AvatarError
        from viewer.avatar_view import run_avatar_viewer

        if args.lookahead_ms < 0:
            raise AvatarError(None, "--lookahead-ms must be >= 0")
        return run_avatar_viewer(path, [Path(a) for a in args.audio], args.host, args.port, args.resolution,
                                 _device(args), args.lookahead_ms / 1000)
    print(f"avatar view: {path} is neither a dataset folder (transforms.json) nor an avatar folder ({CHECKPOINT})",
          file=sys.stderr)
    return 2


def _demo(args: argparse.Namespace) -> int:
    from scenes.demo import run_demo

    return run_demo(Path(args.out) if args.out else None)


def _run(args: argparse.Namespace) -> int:
    import json

    from scenes.job import load_job, run_job

    result = run_job(load_job(Path(args.job), args.out), device=_device(args))
    print(json.dumps({k: v for k, v in result.items() if k != "eval"}, indent=2))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.target == "raster":
        from bench.rasterizer import main as bench_raster

        return bench_raster(args.rest)
    if args.target == "train":
        from bench.training import main as bench_train

        return bench_train(args.rest)
    if args.target == "hash":
        from bench.hash_encoding import main as bench_hash

        return bench_hash(args.rest)
    if args.target == "distributed":
        from bench.distributed import main as bench_distributed

        return bench_distributed(args.rest)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar",
        description="Talking-head avatar studio: video -> dataset -> Gaussian avatar -> speech-driven renders.",
    )
    parser.add_argument("--version", action="version", version=f"avatar-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("capture", help="turn a talking-head video into a calibrated dataset folder",
                       description="Video -> dataset folder (transforms.json, images, masks, audio features).")
    p.add_argument("video", nargs="?", help="talking-head video (phone or camera; any length >= 3 s), or a RIG: a folder "
                                            "with one video (or image folder) per camera, or a composite video with --tile")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--audio", help="speech file to use instead of the video's own audio")
    p.add_argument("--audio-features", nargs="*", default=[], metavar="NPY",
                   help="precomputed ER-NeRF features to carry along (aud_ds.npy, aud_hu.npy)")
    p.add_argument("--fps", type=float, default=25.0, help="target frame rate (default 25)")
    p.add_argument("--size", type=int, default=512, help="side of the square output frames (default 512)")
    p.add_argument("--photometric", action="store_true",
                   help="refine head poses by aligning the skin texture (more accurate head turns for a neutral "
                        "face; about 100 s more per 200 frames)")
    p.add_argument("--calib", metavar="CALIB.json",
                   help="a rig's calibration (`avatar calibrate`); default: a calibration file in RIG, else the face")
    p.add_argument("--tile", action="append", type=_tile, metavar="X,Y,W,H",
                   help="one camera's image inside a composite video (repeat per camera; named tile_0, tile_1, ...)")
    p.add_argument("--from-ernerf", metavar="DIR", help="import an ER-NeRF / TalkingGaussian preprocessed folder")
    p.add_argument("--force", action="store_true", help="redo every stage and replace an existing dataset")
    p.set_defaults(func=_capture)
    p = sub.add_parser("calibrate", help="calibrate a multi-camera rig: intrinsics, distortion and poses -> CALIB.json",
                       description="RIG folder (one video or image folder per camera) -> CALIB.json "
                                   "(format avatar-calibration/1, capture/calibration.py).")
    p.add_argument("rig", help="folder with one video (or one folder of images) per camera, named after the camera; "
                               "or one composite video with --tile")
    p.add_argument("--out", required=True, help="calibration file to write (CALIB.json)")
    p.add_argument("--method", default="auto", choices=["auto", "given", "charuco", "face", "sfm"],
                   help="given: import a calibration file; charuco: a ChArUco board filmed by every camera; face: no "
                        "target, the talking head every camera films; sfm: structure from motion (pycolmap) on a "
                        "static, textured scene, best with the rig carried through it; auto (default): given when a "
                        "file is passed or found in RIG, else charuco when a board is, else face")
    p.add_argument("--same-lens", action="store_true",
                   help="face: the cameras are of one model and zoom, so solve one focal length for all of them")
    p.add_argument("--tile", action="append", type=_tile, metavar="X,Y,W,H",
                   help="one camera's image inside a composite video RIG (repeat per camera; named tile_0, tile_1, ...)")
    p.add_argument("--board", help="the board (caliscope's charuco.toml; default RIG/charuco.toml)")
    p.add_argument("--from", metavar="FILE",
                   help="calibration to import: NeRSemble camera_params.json, caliscope camera_array.toml, nerfstudio "
                        "transforms.json or a COLMAP sparse model folder (default: the first found in RIG)")
    p.add_argument("--intrinsics", metavar="FILE",
                   help="charuco, face: keep these lenses (K, distortion; any --from format) and solve only the poses")
    p.set_defaults(func=_calibrate)
    p = sub.add_parser("train", help="fit a talking Gaussian avatar to a dataset",
                       description="Dataset folder -> avatar folder (checkpoint, config, metrics, canonical.ply).")
    p.add_argument("dataset", help="dataset folder written by `avatar capture`")
    p.add_argument("--out", required=True, help="avatar folder to write")
    p.add_argument("--preset", choices=["cpu", "gpu", "demo"],
                   help="cpu: 256^2, bounded Gaussians (default); gpu: 512^2, paper-scale schedule; demo: short")
    p.add_argument("--config", help="JSON file of training settings over the preset (see recon/config.py)")
    p.add_argument("--iterations", type=int, help="override the preset's number of steps")
    p.add_argument("--size", type=int, help="override the preset's resolution")
    p.add_argument("--seed", type=int, help="override the seed (default 0)")
    p.add_argument("--batch-size", type=int, help="override the views per step (default 1)")
    p.add_argument("--backend", choices=["auto", "cpu", "torch", "cuda", "gsplat"],
                   help="rasterizer backend (default auto: the CPU kernels on a CPU, gsplat's on a GPU)")
    p.add_argument("--device", default="auto",
                   help="where to compute: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, cuda or cuda:N")
    p.add_argument("--method",
                   help="the reconstruction method, recon/method.py: gaussians (the default: the talking Gaussian avatar) "
                        "or nerf (a hash-grid radiance field, ER-NeRF style); when resuming, the checkpoint's")
    p.add_argument("--holdout-cameras", metavar="NAME[,NAME]",
                   help="a rig's dataset: keep these cameras out of training; `avatar eval` scores them as novel views")
    p.add_argument("--resume", action="store_true",
                   help="continue from the folder's last checkpoint, with its settings (settings given here must "
                        "match them)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the settings given or the dataset differ from the "
                        "checkpoint's (the settings given are used)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine, each step's views shared out among them (one GPU "
                        "each on CUDA, gloo on CPUs; needs --batch-size N or more); across machines use torchrun "
                        "(README). Default 1")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="score an avatar on held-out frames (PSNR, SSIM, LMD, lip sync, FPS)",
                       description="Writes AVATAR/eval.json and AVATAR/eval_strip.png; with --drive, "
                                   "AVATAR/eval_drive_<name>.json per speech file.")
    p.add_argument("avatar", help="avatar folder written by `avatar train`")
    p.add_argument("--drive", nargs="+", metavar="SPEECH",
                   help="score lip sync driven by these speech files instead (any voice)")
    p.add_argument("--camera", metavar="NAME",
                   help="with --drive: the rig camera whose views are replayed and whose real mouth is the reference "
                        "(default: the first)")
    p.add_argument("--device", default="auto",
                   help="where to compute: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, cuda or cuda:N")
    p.set_defaults(func=_eval)
    p = sub.add_parser("speak", help="live speech: stream a speech file through the low-latency path a microphone "
                                     "takes, and report latency and frame rate",
                       description="Feeds SPEECH in chunks, as a microphone would, through causal features, motion, "
                                   "deformation, rasterization and JPEG encoding (recon/live.py), and reports the "
                                   "sound-to-frame latency per stage and the frame rate sustained.")
    p.add_argument("avatar", help="avatar folder written by `avatar train`")
    p.add_argument("--audio", required=True, help="speech file standing in for the microphone")
    p.add_argument("--realtime", action="store_true",
                   help="deliver the audio at its own pace, as a microphone does (default: as fast as frames render)")
    p.add_argument("--lookahead-ms", type=float, default=80.0,
                   help="how far past a frame its speech features may look (default 80)")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="microphone chunk length (default 20)")
    p.add_argument("--size", type=int, help="frame size in pixels (default: the avatar's)")
    p.add_argument("--out", help="also write the frames shown (each held until the next) as an mp4 with the speech")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    p.add_argument("--device", default="auto",
                   help="where to compute: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, cuda or cuda:N")
    p.set_defaults(func=_speak)
    p = sub.add_parser("render", help="drive an avatar with speech: mp4 with H.264 video and AAC audio")
    p.add_argument("avatar", help="avatar folder written by `avatar train`")
    p.add_argument("--audio", required=True, help="speech file (wav, mp3, flac; any rate and channels)")
    p.add_argument("--out", required=True, help="mp4 to write")
    p.add_argument("--camera", default="dataset",
                   help="dataset (replay the capture's head motion; dataset:NAME through a rig's camera NAME, "
                        "default its first), orbit, or fixed:YAW,PITCH in degrees")
    p.add_argument("--size", type=int, help="frame side in pixels (default: the avatar's training size)")
    p.add_argument("--torso", choices=("3d", "frame", "none"),
                   help="behind the head: 3d (the avatar's neck-and-shoulders branch; the default when it has "
                        "one), frame (the dataset frames' own pixels; dataset camera only) or none (the plate)")
    p.add_argument("--device", default="auto",
                   help="where to compute: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, cuda or cuda:N")
    p.set_defaults(func=_render)
    p = sub.add_parser("export", help="export an avatar to standard 3DGS .ply (canonical or deformed), or a "
                                      "radiance field's surface as a mesh")
    p.add_argument("avatar", help="avatar folder written by `avatar train`")
    p.add_argument("--ply", help="the .ply to write (canonical, or dataset frame --frame K)")
    p.add_argument("--frame", type=int, help="deform as in this dataset frame")
    p.add_argument("--audio", help="speech file: write one deformed .ply per video frame into --frames")
    p.add_argument("--frames", help="folder for the per-frame .ply files")
    p.add_argument("--mesh", help="a radiance-field avatar (--method nerf): write its surface as a .ply triangle mesh "
                                  "(marching cubes of the density; canonical, or dataset frame --frame K)")
    p.add_argument("--mesh-resolution", type=int, default=192, help="grid cells a side for --mesh (default 192)")
    p.add_argument("--device", default="auto",
                   help="where to compute: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, cuda or cuda:N")
    p.set_defaults(func=_export)
    p = sub.add_parser("view", help="open the browser studio on an avatar (or a dataset, to inspect a capture)")
    p.add_argument("path", help="avatar folder (`avatar train`) or dataset folder (`avatar capture`)")
    p.add_argument("--audio", nargs="*", default=[], help="speech files to offer for playback (avatars)")
    p.add_argument("--resolution", type=int, help="long side of rendered frames (default: the training size on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--device", default="auto",
                   help="where an avatar renders: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, "
                        "cuda or cuda:N (a dataset is always shown from the host)")
    p.add_argument("--lookahead-ms", type=float, default=80.0,
                   help="the microphone: how far past a frame its speech features may look (default 80; more "
                        "articulates better and shows later)")
    p.set_defaults(func=_view)
    p = sub.add_parser("demo", help="the whole pipeline on the built-in sample subject (scenes/demo.toml)")
    p.add_argument("--out", help="working folder (default outputs/demo); reruns reuse it")
    p.set_defaults(func=_demo)
    p = sub.add_parser("run", help="run a job config: capture -> train -> render -> eval (see scenes/*.toml)")
    p.add_argument("job", help="job TOML file (scenes/phone_video.toml shows every option)")
    p.add_argument("--out", help="working folder (default: the job's [job] out)")
    p.add_argument("--device", default="auto",
                   help="where to train, render and score: auto (a CUDA GPU when there is one, else the CPU; the "
                        "default), cpu, cuda or cuda:N")
    p.set_defaults(func=_run)
    p = sub.add_parser("bench", help="benchmarks (raster: rasterizer backends vs gsplat; train: views per step "
                                     "and prefetch; hash: the hash encoding's kernels vs its torch reference; "
                                     "distributed: training over 1..N processes)")
    p.add_argument("target", choices=["raster", "train", "hash", "distributed"], help="what to benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see `avatar bench raster --help`)")
    p.set_defaults(func=_bench)
    return parser


def log_dir() -> Path:
    """Where tracebacks of internal errors go: $AVATAR_LOG_DIR, else the XDG state folder."""
    if os.environ.get("AVATAR_LOG_DIR"):
        return Path(os.environ["AVATAR_LOG_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "avatar-studio" / "logs"


def _log_internal_error(stage: str, argv: list[str], exc: BaseException) -> Path | None:
    """Write the traceback of an unexpected exception to a log file; its path, or None when no
    log folder is writable (the traceback then goes to stderr as the last resort)."""
    import traceback

    text = (f"avatar-studio {__version__}, python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"command: avatar {' '.join(argv)}\n\n" + "".join(traceback.format_exception(exc)))
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "avatar-studio-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    print(text, file=sys.stderr)
    return None


def _ranked(message: str) -> str:
    """An error message, its first line marked with the rank that met it when this process
    is one of several training (recon/distributed.py)."""
    from recon.distributed import launched

    if not launched():
        return message
    first, newline, rest = message.partition("\n")
    return f"{first} (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}){newline}{rest}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: 0 on success, 1 on bad input (a named error), 2 on an internal error
    (one line here, the traceback in a log file) and, as argparse does, on a malformed
    command line; 130 when interrupted."""
    import logging

    from .errors import AvatarError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except AvatarError as exc:
        print(f"error: {_ranked(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"avatar {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is our bug: one line for the user, the rest in a log
        log = _log_internal_error(args.command, argv, exc)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        details = f" (details: {log})" if log else ""
        print(_ranked(f"error: internal error in {args.command}: {type(exc).__name__}"
                      f"{': ' + message if message else ''}{details}"), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
