"""Reader of capture's dataset folders (avatar/dataset_format.py), streamed from disk.

Frames, masks and features are read on demand through a small LRU cache, so memory
stays bounded however long the clip is (today's tools preload 60 GB+).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from avatar.errors import AvatarError
from avatar.io import file_digest
from avatar.dataset_format import MASK_NAMES, camera_table, frame_camera, open_checked


@dataclass
class Frame:
    """One training frame at `size` x `size` (float32 tensors, values in [0, 1])."""

    index: int  # position in the dataset
    frame_index: int  # the timestep: row of the audio features
    camera: int  # index into Dataset.cameras
    image: torch.Tensor  # [H, W, 3]
    masks: dict[str, torch.Tensor]  # name -> [H, W] bool
    c2w: torch.Tensor  # [4, 4] camera-to-world, OpenGL axes
    eye_openness: float
    mouth_opening: float


@dataclass
class Camera:
    """One camera of a dataset, at the reader's `size`."""

    name: str
    K: torch.Tensor  # [3, 3] intrinsics
    background: torch.Tensor  # [H, W, 3] its plate behind the subject

    def to(self, device: torch.device | str) -> "Camera":
        return Camera(self.name, self.K.to(device), self.background.to(device))


def dataset_fingerprint(root: Path) -> str:
    """Identity of a dataset's contents: its transforms.json changes whenever it is captured
    again (and records what it was captured from)."""
    try:
        return file_digest(Path(root) / "transforms.json")
    except OSError:
        return "unreadable"


GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
"""Flips a camera's axes between OpenGL (transforms.json) and OpenCV (the rasterizer); its own inverse."""


def world_to_camera(c2w: torch.Tensor) -> torch.Tensor:
    """[4, 4] world-to-camera in OpenCV axes of a camera-to-world c2w [4, 4] in OpenGL axes."""
    return torch.linalg.inv(c2w @ GL_TO_CV.to(c2w))


def spread(ids: list[int], n: int) -> list[int]:
    """At most n of `ids`, evenly spaced from the first to the last."""
    return [ids[k] for k in np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(int)]


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """[H, W] bool -> bool, dilated by a (2 px + 1) square."""
    return torch.nn.functional.max_pool2d(mask[None, None].float(), 2 * px + 1, stride=1, padding=px)[0, 0] > 0


def behind_head(frame: Frame, plate: torch.Tensor) -> torch.Tensor:
    """What lies behind the head in a dataset frame [H, W, 3]: the frame itself outside its
    head mask (torso, hair below the chin, background), the background plate [H, W, 3] of
    its camera inside it. The head is rendered over this, in training and when replaying the
    dataset's cameras, as ER-NeRF composites its head over the real torso."""
    return torch.where(frame.masks["head"][..., None], plate, frame.image)


class Dataset:
    """Random access to a captured dataset; images are decoded lazily.

    Args:
        root: the dataset folder written by `avatar capture`; checked up front
            (avatar.dataset_format.open_checked).
        size: resize frames to size x size (None keeps the capture size).
        cache_frames: how many decoded frames to keep in memory.
        check_images: also decode every image and mask before anything reads them (training).
        device: where frames, masks, poses, intrinsics and the plate are put (recon/device.py):
            a torch.device, or "cpu" for the host (what `on` gives the host-side setup).
    """

    def __init__(self, root: str | Path, size: int | None = None, cache_frames: int = 64, check_images: bool = False,
                 device: torch.device | str = "cpu"):
        self.root = Path(root)
        self.device = device
        self.meta, self.features = open_checked(self.root, decode=check_images)
        self.frames = self.meta["frames"]
        self.capture_size = int(self.meta["w"])
        self.size = size or self.capture_size
        s = self.size / self.capture_size
        self.cameras = [Camera(c["name"], torch.tensor([[c["fl_x"] * s, 0, c["cx"] * s], [0, c["fl_y"] * s, c["cy"] * s],
                                                        [0, 0, 1]], dtype=torch.float32, device=self.device),
                               self._read_rgb(self.root / c["background"])) for c in camera_table(self.meta)]
        """Every camera of the dataset (a monocular capture has one)."""
        number = {c.name: n for n, c in enumerate(self.cameras)}
        self.camera_of = [number[frame_camera(f)] for f in self.frames]
        """Per frame, its index into `cameras`."""
        self.K, self.background = self.cameras[0].K, self.cameras[0].background
        """The first camera's intrinsics [3, 3] and plate [H, W, 3]: what a trained avatar keeps
        for its default view (a frame's own are `intrinsics(i)` and `plate(i)`)."""
        self._cache: OrderedDict[int, Frame] = OrderedDict()
        self._cache_frames = cache_frames

    def __len__(self) -> int:
        return len(self.frames)

    def on(self, device: torch.device | str, cache_frames: int | None = None) -> "Dataset":
        """The same dataset read onto another device, with a cache of its own (of
        `cache_frames`, default this one's size): the host-side setup of a run on a GPU
        reads its frames on the CPU."""
        other = copy.copy(self)
        other.device = device
        other.cameras = [c.to(device) for c in self.cameras]
        other.K, other.background = other.cameras[0].K, other.cameras[0].background
        other._cache = OrderedDict()
        other._cache_frames = self._cache_frames if cache_frames is None else cache_frames
        return other

    def _read(self, path: Path, flags: int) -> np.ndarray:
        img = cv2.imread(str(path), flags)
        if img is None:
            raise AvatarError(path, "missing or unreadable in the dataset", "re-run `avatar capture --force`")
        if img.shape[0] != self.size:
            interp = cv2.INTER_AREA if img.shape[0] > self.size else cv2.INTER_LINEAR
            img = cv2.resize(img, (self.size, self.size), interpolation=interp)
        return img

    def _read_rgb(self, path: Path) -> torch.Tensor:
        img = cv2.cvtColor(self._read(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return torch.from_numpy(img).to(self.device).float() / 255

    def __getitem__(self, i: int) -> Frame:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        return self.keep(self.read_frame(i))

    def cached(self, i: int) -> bool:
        return i in self._cache

    def keep(self, frame: Frame) -> Frame:
        """Put a frame read by `read_frame` into the cache (dropping the least recently used)."""
        self._cache[frame.index] = frame
        self._cache.move_to_end(frame.index)
        if len(self._cache) > self._cache_frames:
            self._cache.popitem(last=False)
        return frame

    def read_frame(self, i: int) -> Frame:
        """Decode frame i from disk, bypassing the cache (it touches no state of the reader,
        so a background thread may call it: recon/datamanager.py prefetches with it)."""
        f = self.frames[i]
        return Frame(
            index=i,
            frame_index=int(f["frame_index"]),
            camera=self.camera_of[i],
            image=self._read_rgb(self.root / f["file_path"]),
            masks={m: torch.from_numpy(self._read(self.root / f[f"{m}_mask_path"], cv2.IMREAD_GRAYSCALE) > 127)
                   .to(self.device) for m in MASK_NAMES},
            c2w=self.c2w(i),
            eye_openness=float(f.get("eye_openness", 1.0)),
            mouth_opening=float(f.get("mouth_opening", 0.0)),
        )

    def views_of(self, camera: int = 0) -> list[int]:
        """Frame indices of one camera (default the first, whose intrinsics and plate a trained
        avatar keeps), in dataset order: that camera's clip."""
        return [i for i in range(len(self)) if self.camera_of[i] == camera]

    def camera_index(self, name: str | None) -> int:
        """The position of the camera called `name` (None: the first); AvatarError naming
        the dataset and its cameras when it has none of that name."""
        if name is None:
            return 0
        names = [c.name for c in self.cameras]
        if name not in names:
            raise AvatarError(self.root, f"has no camera named {name!r}", f"name one of its cameras: {', '.join(names)}")
        return names.index(name)

    def intrinsics(self, i: int) -> torch.Tensor:
        """[3, 3] the intrinsics of frame i's camera, at `size`."""
        return self.cameras[self.camera_of[i]].K

    def plate(self, i: int) -> torch.Tensor:
        """[H, W, 3] the background plate of frame i's camera."""
        return self.cameras[self.camera_of[i]].background

    @property
    def has_speech(self) -> bool:
        """Whether the dataset was filmed with sound (it has audio features)."""
        return self.features is not None

    def landmarks(self, i: int) -> np.ndarray | None:
        """[478, 2] mediapipe landmarks of frame i in pixels at `size`, or None when the dataset
        has none (ER-NeRF imports). Read through a memory map, never loaded whole."""
        name = self.meta.get("landmarks")
        if not name or not (self.root / name).is_file():
            return None
        if not hasattr(self, "_landmarks"):
            self._landmarks = np.load(self.root / name, mmap_mode="r")
        return np.asarray(self._landmarks[i, :, :2], np.float32) * (self.size / self.capture_size)

    def face_geometry(self) -> torch.Tensor | None:
        """[L, 3] the subject's fitted canonical face (landmark layout: 478 mediapipe points, or
        68 for ER-NeRF imports) in the head frame, metres; None when the dataset has none."""
        path = self.root / self.meta.get("face_geometry", "face_geometry.npz")
        if not path.is_file():
            return None
        with np.load(path) as z:
            return torch.from_numpy(z["canonical"].astype(np.float32))

    def split(self, holdout_fraction: float = 1 / 11,
              holdout_cameras: tuple[str, ...] | list[str] = ()) -> tuple[list[int], list[int]]:
        """Train / held-out-time frame indices: every view of the last `holdout_fraction` of
        the timesteps is held out. Views of `holdout_cameras` are in neither list: they are
        the novel views (`novel_views`). A camera the dataset lacks, or holding out every
        camera, is an AvatarError."""
        held = self._cameras_named(holdout_cameras)
        steps = sorted({int(f["frame_index"]) for f in self.frames})
        n_test = max(1, int(round(len(steps) * holdout_fraction)))
        later = set(steps[len(steps) - n_test:])
        kept = [i for i in range(len(self)) if self.camera_of[i] not in held]
        return ([i for i in kept if int(self.frames[i]["frame_index"]) not in later],
                [i for i in kept if int(self.frames[i]["frame_index"]) in later])

    def novel_views(self, holdout_cameras: tuple[str, ...] | list[str], holdout_fraction: float = 1 / 11) -> list[int]:
        """Frame indices of `holdout_cameras` at the training timesteps (`split`'s): views of
        moments the avatar was trained on, from cameras it never saw."""
        held = self._cameras_named(holdout_cameras)
        train, _ = self.split(holdout_fraction)
        steps = {int(self.frames[i]["frame_index"]) for i in train}
        return [i for i in range(len(self)) if self.camera_of[i] in held and int(self.frames[i]["frame_index"]) in steps]

    def _cameras_named(self, names: tuple[str, ...] | list[str]) -> set[int]:
        index = {c.name: n for n, c in enumerate(self.cameras)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise AvatarError(self.root, f"has no camera named {', '.join(map(repr, unknown))}",
                              f"hold out some of its cameras: {', '.join(index)}")
        if names and len(set(names)) == len(self.cameras):
            raise AvatarError(self.root, "would have every camera held out, and nothing to train on",
                              "hold out fewer cameras")
        return {index[n] for n in names}

    def c2w(self, i: int) -> torch.Tensor:
        """[4, 4] frame i's camera-to-world, OpenGL axes (the dataset's)."""
        return torch.tensor(self.frames[i]["transform_matrix"], dtype=torch.float32, device=self.device)

    def viewmat(self, i: int) -> torch.Tensor:
        """[4, 4] world-to-camera in OpenCV axes (what the rasterizer takes)."""
        return world_to_camera(self.c2w(i))
