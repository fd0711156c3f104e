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


def test_mediapipe_graphs_run_quietly(sample_dataset):
    """Blank frames first, then a face (the landmark model first runs on it)."""
    face = sorted((sample_dataset / "images").glob("*.jpg"))[0]
    code = textwrap.dedent(f"""
        import cv2, numpy as np
        from capture.tracking import FaceDetector, FaceTracker, PersonSegmenter
        face = cv2.cvtColor(cv2.imread({str(face)!r}), cv2.COLOR_BGR2RGB)
        blank = np.zeros_like(face)
        # The segmenter first, as a capture runs: the face mesh's threads then log while
        # no call is in progress, in about half of the runs; four rounds catch it.
        for _ in range(4):
            with PersonSegmenter() as s, FaceTracker() as t, FaceDetector() as d:
                for img in (face, blank, face):
                    found = t(img)
                    s(img), d(img)
        assert found, "no face in the sample frame"
        with FaceTracker(max_faces=1, video_mode=False) as t:
            assert t(face)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr


def test_the_dataset_formats_face_triangles_are_mediapipes():
    """avatar/face_triangles.npy is the face mesh's triangles: the 3-cliques of the
    tessellation edges mediapipe ships (checked here, where mediapipe is at hand)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    from avatar.dataset_format import face_triangles

    adjacent: dict[int, set[int]] = {}
    for a, b in FACEMESH_TESSELATION:
        adjacent.setdefault(a, set()).add(b)
        adjacent.setdefault(b, set()).add(a)
    cliques = sorted({tuple(sorted((a, b, c))) for a in adjacent for b in adjacent[a] if b > a
                      for c in adjacent[a] & adjacent[b] if c > b})
    assert face_triangles() == cliques and len(cliques) == 854
