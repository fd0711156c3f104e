"""`avatar view DATASET`: inspect a capture in the browser (viser).

Shows every sampled frame as a camera frustum carrying its image (landmarks drawn on it),
each with its own camera's field of view (a rig's cameras each have their own), the head
frame's axes at the origin, and the fitted canonical face (rigid landmarks in green), so
a bad focal, a wobbling head, a lost track or a misplaced rig camera can be seen.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from avatar.errors import AvatarError
from avatar.dataset_format import RIGID, camera_table, frame_camera

THUMB = 160  # frustum image size in pixels


def _thumbnail(root: Path, frame: dict, lm: np.ndarray | None) -> np.ndarray:
    img = cv2.imread(str(root / frame["file_path"]))
    if img is None:
        raise AvatarError(root / frame["file_path"], "missing or unreadable in the dataset")
    if lm is not None:
        for x, y in lm[:, :2]:
            cv2.circle(img, (int(x), int(y)), 2, (0, 255, 0), -1)
    return cv2.cvtColor(cv2.resize(img, (THUMB, THUMB), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def build_dataset_scene(server, root: str | Path, max_frames: int = 48) -> int:
    """Add the capture's cameras, face and axes to a viser server; returns frustums added."""
    import viser.transforms as vtf

    root = Path(root)
    tpath = root / "transforms.json"
    if not tpath.is_file():
        raise AvatarError(root, "is not a dataset folder (no transforms.json)")
    meta = json.loads(tpath.read_text())
    frames = meta["frames"]
    lms = np.load(root / meta["landmarks"]) if meta.get("landmarks") and (root / meta["landmarks"]).is_file() else None
    cameras = {c["name"]: c for c in camera_table(meta)}
    picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    for i in picks:
        c2w = np.asarray(frames[i]["transform_matrix"], np.float64) @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV axes
        name = frame_camera(frames[i])
        fov_y = 2 * np.arctan(meta["h"] / (2 * cameras[name]["fl_y"]))
        server.scene.add_camera_frustum(
            f"/cameras/{name}/{frames[i]['frame_index']:06d}", fov=float(fov_y), aspect=meta["w"] / meta["h"], scale=0.04,
            image=_thumbnail(root, frames[i], None if lms is None else lms[i]),
            wxyz=vtf.SO3.from_matrix(c2w[:3, :3]).wxyz, position=c2w[:3, 3],
        )
    server.scene.add_frame("/head", axes_length=0.08, axes_radius=0.002)
    geom = root / meta.get("face_geometry", "face_geometry.npz")
    if geom.is_file():
        with np.load(geom) as z:
            canon = z["canonical"].astype(np.float32)
        colors = np.tile(np.array([[230, 230, 230]], np.uint8), (len(canon), 1))
        colors[list(RIGID)] = (40, 220, 40)
        server.scene.add_point_cloud("/head/canonical_face", canon, colors, point_size=0.002)
    lenses = ", ".join(f"{name} {c['fl_x']:.0f} px ({np.degrees(2 * np.arctan(meta['w'] / (2 * c['fl_x']))):.1f} deg)"
                       for name, c in cameras.items())
    server.gui.add_markdown(
        f"**{root.name}**: {len(frames)} frames from {len(cameras)} camera{'s' if len(cameras) > 1 else ''}; "
        f"focal length and field of view: {lenses}. Green points: rigid landmarks used for the head pose."
    )
    return len(picks)


def serve_dataset(root: str | Path, host: str = "127.0.0.1", port: int = 8080):
    """Start the viewer and return the server (it serves in background threads)."""
    import viser

    server = viser.ViserServer(host=host, port=port, verbose=False)
    try:
        build_dataset_scene(server, root)
    except BaseException:
        server.stop()
        raise
    return server


def run_dataset_viewer(root: str | Path, host: str, port: int) -> int:
    server = serve_dataset(root, host, port)
    print(f"viewing {root} at http://{host}:{server.get_port()} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        server.stop()
    return 0
