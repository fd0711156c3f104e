"""mediapipe's graphs start without their native notices on the console, and the filter
that drops them lets any other native output through."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from capture.tracking import native_stderr_filtered

ROOT = Path(__file__).resolve().parents[1]


def test_filter_drops_notices_and_keeps_other_native_lines(capfd):
    with native_stderr_filtered():
        os.write(2, b"W0000 00:00:1.2 7 inference_feedback_manager.cc:114] Feedback manager requires...\n")
        os.write(2, b"E0000 a real native error\n")
    assert capfd.readouterr().err == "E0000 a real native error\n"


def test_mediapipe_graphs_start_quietly():
    code = textwrap.dedent("""
        import numpy as np
        from capture.tracking import FaceDetector, FaceTracker, PersonSegmenter
        img = np.zeros((128, 128, 3), np.uint8)
        with FaceDetector() as d, FaceTracker() as t, PersonSegmenter() as s:
            for _ in range(2):
                d(img), t(img), s(img)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr
