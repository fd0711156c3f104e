"""`avatar demo`: the main job (scenes/demo.toml) on the built-in sample subject.

generate the sample clip -> avatar capture -> avatar train (demo preset) -> avatar render
with a second, different voice on an orbiting camera -> avatar eval, then a summary:
capture accuracy against ground truth, held-out PSNR, the video and its contact sheet,
and the command that opens the viewer. A second run reuses every finished stage.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .job import JOB_DIR, load_job, run_job
from .sample import SampleConfig, compare_capture, generate_sample


def run_demo(out: Path | None = None, job_file: Path = JOB_DIR / "demo.toml") -> int:
    t0 = time.perf_counter()
    job = load_job(job_file, out)
    truth_path = job.out / "sample" / "sample_truth.json"
    if truth_path.is_file():
        truth = json.loads(truth_path.read_text())
        print(f"[sample] reusing {job.out / 'sample' / 'sample.mp4'}", file=sys.stderr)
    else:
        print("[sample] generating the sample subject (astronaut relief, synthetic speech)", file=sys.stderr)
        truth = generate_sample(job.out / "sample", SampleConfig())
    result = run_job(job)
    dataset = Path(result["dataset"])
    score = compare_capture(truth, json.loads((dataset / "transforms.json").read_text()))
    report = json.loads((dataset / "capture_report.json").read_text())
    from recon.render import contact_sheet

    video = Path(result["videos"][0])
    sheet = contact_sheet(video, video.with_name(video.stem + "_sheet.png"))
    ev = result.get("eval", {})
    lip = (ev.get("lipsync") or {}).get("avatar", {})
    summary = {"capture_vs_truth": score, "eval": {**{k: ev.get(k) for k in ("psnr", "psnr_face", "ssim", "lmd",
                                                                             "lmd_static_mouth", "fps")},
                                                   "lipsync": ev.get("lipsync")},
               "video": str(video), "contact_sheet": str(sheet), "wall_time_s": time.perf_counter() - t0}
    from avatar.io import write_json

    write_json(job.out / "demo_summary.json", summary)
    print(f"""
capture vs ground truth ({score['frames_compared']} frames):
  head rotation error   median {score['rotation_error_deg']['median']:.2f} deg, p90 {score['rotation_error_deg']['p90']:.2f} deg
  focal length error    {100 * score['focal_error']:+.1f} %
  mouth vs jaw opening  correlation {score['mouth_vs_jaw_correlation']:.2f}
  reprojection error    median {report['pose']['reprojection_px']['median']:.2f} px
avatar on held-out frames:
  PSNR                  {ev.get('psnr', float('nan')):.2f} dB (face {ev.get('psnr_face') or float('nan'):.2f} dB)
  mouth LMD             {ev.get('lmd') or float('nan'):.2f} px (static-mouth baseline {ev.get('lmd_static_mouth') or float('nan'):.2f} px)
  mouth opening         correlation {lip.get('opening_corr') or float('nan'):.2f} with the real one, range {lip.get('opening_range_ratio') or float('nan'):.2f} of it
video:          {video}
contact sheet:  {sheet}
capture sheet:  {dataset / 'preview.png'}
summary:        {job.out / 'demo_summary.json'}
wall time       {summary['wall_time_s']:.0f} s

open the viewer:  avatar view {result['avatar']} --audio {job.render_audio[0]}""")
    return 0
