"""Face tracking with mediapipe 0.10.21's bundled face mesh (478 landmarks, offline).

Landmarks are returned in pixels: x, y in the image, z in the same pixel scale as x
(mediapipe's relative depth, positive away from the camera).
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextlib import ExitStack, contextmanager

import numpy as np

from avatar.dataset_format import BROW_TOP, CHIN

def face_height(lm: np.ndarray) -> np.ndarray:
    """Brow-to-chin distance in pixels. lm: [..., 478, >=2] -> [...]."""
    return np.linalg.norm(lm[..., BROW_TOP, :2] - lm[..., CHIN, :2], axis=-1)


MEDIAPIPE_NOTICES = (
    "All log messages before absl::InitializeLog()",
    "inference_feedback_manager",
    "Created TensorFlow Lite XNNPACK delegate",
    "NORM_RECT without IMAGE_DIMENSIONS",
)
"""mediapipe's native start-up notices: absl/TFLite write them straight to file
descriptor 2, from the graph's own threads, while a graph starts and when one of its
models first runs, whatever Python's logging says."""

_LOG_HEADER = re.compile(rb"^([IWEF]\d{4} |INFO: |WARNING: )")  # absl / TFLite line starts


class _NativeStderrFilter:
    """While held, file descriptor 2 is a pipe: a thread forwards what arrives to the real
    stderr at once, less the lines that contain a notice. Held for the whole life of every
    mediapipe graph, because its threads log when they please: filtering only around our
    calls let notices through (one process printed them between two calls)."""

    def __init__(self, drop: tuple[str, ...]):
        self.drop = tuple(d.encode() for d in drop)
        self.lock = threading.Lock()
        self.users = 0

    def _pump(self, read_fd: int, out_fd: int) -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._write(out_fd, line + b"\n")
            if pending and not _LOG_HEADER.match(pending):  # a progress bar's partial line goes out now
                self._write(out_fd, pending)
                pending = b""
        self._write(out_fd, pending)
        os.close(read_fd)

    def _write(self, fd: int, data: bytes) -> None:
        if data and not any(d in data for d in self.drop):
            os.write(fd, data)

    def acquire(self) -> None:
        with self.lock:
            self.users += 1
            if self.users > 1:
                return
            sys.stderr.flush()
            self.saved = os.dup(2)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 2)
            os.close(write_fd)
            self.thread = threading.Thread(target=self._pump, args=(read_fd, self.saved), daemon=True,
                                           name="native-stderr-filter")
            self.thread.start()

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users > 0:
                return
            sys.stderr.flush()
            os.dup2(self.saved, 2)  # closes the pipe's last write end: the pump drains and stops
            self.thread.join(timeout=5)
            os.close(self.saved)


_filter = _NativeStderrFilter(MEDIAPIPE_NOTICES)


@contextmanager
def native_stderr_filtered():
    """Within the block, lines written to file descriptor 2 (by native code and its threads
    too) that contain one of MEDIAPIPE_NOTICES are dropped; everything else goes out as
    it comes."""
    _filter.acquire()
    try:
        yield
    finally:
        _filter.release()


class _Solution:
    """A mediapipe solution graph, closed on exit (`with Tracker() as t:`); the native
    stderr filter is held from before the graph is built until it is closed."""

    _graph = None

    def _start(self, build) -> None:
        self._quiet = ExitStack()
        self._quiet.enter_context(native_stderr_filtered())
        try:
            self._graph = build()
        except BaseException:
            self._quiet.close()
            raise

    def _process(self, rgb: np.ndarray):
        return self._graph.process(np.ascontiguousarray(rgb))

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
            self._quiet.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FaceTracker(_Solution):
    """mediapipe face mesh in video mode; returns every face found, largest first."""

    def __init__(self, max_faces: int = 2, video_mode: bool = True):
        import mediapipe as mp

        self._start(lambda: mp.solutions.face_mesh.FaceMesh(
            static_image_mode=not video_mode, max_num_faces=max_faces, refine_landmarks=True,
            min_detection_confidence=0.5, min_tracking_confidence=0.5,
        ))

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        """rgb: [H, W, 3] uint8 -> list of [478, 3] float32 landmark arrays in pixels."""
        h, w = rgb.shape[:2]
        result = self._process(rgb)
        faces = []
        for face in result.multi_face_landmarks or []:
            pts = np.array([(p.x * w, p.y * h, p.z * w) for p in face.landmark], np.float32)
            faces.append(pts)
        faces.sort(key=lambda f: -float(face_height(f)))
        return faces


class FaceDetector(_Solution):
    """mediapipe's full-range face detector (bundled): finds small and distant faces too."""

    def __init__(self, min_confidence: float = 0.5):
        import mediapipe as mp

        self._start(lambda: mp.solutions.face_detection.FaceDetection(model_selection=1,
                                                                     min_detection_confidence=min_confidence))

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        """rgb: [H, W, 3] uint8 -> boxes [x0, y0, w, h] in pixels, largest first."""
        h, w = rgb.shape[:2]
        boxes = []
        for d in self._process(rgb).detections or []:
            b = d.location_data.relative_bounding_box
            boxes.append(np.array([b.xmin * w, b.ymin * h, b.width * w, b.height * h], np.float32))
        boxes.sort(key=lambda b: -float(b[2] * b[3]))
        return boxes


class PersonSegmenter(_Solution):
    """mediapipe selfie segmentation (bundled model): person probability per pixel."""

    def __init__(self):
        import mediapipe as mp

        self._start(lambda: mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0))

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """rgb: [H, W, 3] uint8 -> [H, W] float32 in [0, 1]."""
        return self._process(rgb).segmentation_mask.astype(np.float32)

