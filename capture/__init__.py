"""capture/: video -> dataset folder (the folder's format: avatar/dataset_format.py).

Later stages read the dataset folder, never capture's modules. The tools they share with
capture are this package's public API:
    FaceTracker                               mediapipe's face mesh, offline (`avatar eval`
                                              tracks the avatar's renders with it)
    load_audio, check_speech, compute_features   any speech file -> the per-frame features
                                              capture writes (render and eval drive an
                                              avatar with new speech through them)
"""

from .audio import check_speech, compute_features, load_audio
from .tracking import FaceTracker

__all__ = ["FaceTracker", "check_speech", "compute_features", "load_audio"]
