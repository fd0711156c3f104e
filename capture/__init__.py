"""capture/: video -> dataset folder (the folder's format: avatar/dataset_format.py).

Later stages read the dataset folder, never capture's modules. The tools they share with
capture are this package's public API, imported on first use (so that reading a dataset
pulls in neither the face tracker nor the audio stack):
    FaceTracker                               mediapipe's face mesh, offline (`avatar eval`
                                              tracks the avatar's renders with it)
    load_audio, check_speech, compute_features   any speech file -> the per-frame features
                                              capture writes (render and eval drive an
                                              avatar with new speech through them)
    SpeechStream                              the same features of live speech, causally,
                                              as its chunks arrive (recon/live.py)
"""

import importlib

_TOOLS = {"FaceTracker": "tracking", "check_speech": "audio", "compute_features": "audio", "load_audio": "audio",
          "SpeechStream": "audio"}
__all__ = sorted(_TOOLS)


def __getattr__(name: str):
    if name in _TOOLS:
        return getattr(importlib.import_module(f".{_TOOLS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
