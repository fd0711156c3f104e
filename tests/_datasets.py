"""Small synthetic dataset folders (a monocular one in format avatar-dataset/1, a rig's in
avatar-dataset/2) for the reader's, the validator's and the viewer's tests."""

import json

import cv2
import numpy as np

from avatar.dataset_format import save_features


def make_dataset(root, n=6, size=32, landmarks=False):
    """Write n random frames at size x size with all five masks, features and, with
    `landmarks`, a landmark track and a canonical face."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    frames = []
    for k in range(n):
        cv2.imwrite(str(root / "images" / f"{k:06d}.jpg"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        entry = {"file_path": f"images/{k:06d}.jpg", "transform_matrix": np.eye(4).tolist(), "time": k / 25,
                 "frame_index": k, "eye_openness": 0.5, "mouth_opening": 0.1}
        for m in ("person", "head", "mouth", "eyes", "torso"):
            (root / "masks" / m).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "masks" / m / f"{k:06d}.png"), np.full((size, size), 255 * (m != "mouth"), np.uint8))
            entry[f"{m}_mask_path"] = f"masks/{m}/{k:06d}.png"
        frames.append(entry)
    cv2.imwrite(str(root / "background.png"), np.zeros((size, size, 3), np.uint8))
    save_features(root / "audio_features.npz", {"mel": np.zeros((n, 16, 80), np.float32),
                                                "energy": np.zeros(n, np.float32)}, 25.0)
    meta = {"format": "avatar-dataset/1", "fl_x": 40.0, "fl_y": 40.0, "cx": size / 2, "cy": size / 2, "w": size,
            "h": size, "fps": 25.0, "audio_features": "audio_features.npz", "background": "background.png",
            "frames": frames}
    if landmarks:
        np.save(root / "landmarks.npy", rng.uniform(0, size, (n, 478, 3)).astype(np.float32))
        np.savez(root / "face_geometry.npz", canonical=rng.normal(0, 0.05, (478, 3)).astype(np.float32),
                 focal=np.float32(40))
        meta.update(landmarks="landmarks.npy", face_geometry="face_geometry.npz")
    (root / "transforms.json").write_text(json.dumps(meta))


def make_rig_dataset(root, cameras=("a", "b"), steps=5):
    """make_dataset's frames as a rig's (format avatar-dataset/2): one view per camera per
    timestep, each camera with its own intrinsics and plate; no audio features."""
    make_dataset(root, n=len(cameras) * steps)
    meta = json.loads((root / "transforms.json").read_text())
    meta["format"] = "avatar-dataset/2"
    meta["cameras"] = []
    for n, name in enumerate(cameras):
        cv2.imwrite(str(root / f"bg_{name}.png"), np.full((32, 32, 3), 40 * (n + 1), np.uint8))
        meta["cameras"].append({"name": name, "fl_x": 40.0 + 10 * n, "fl_y": 41.0 + 10 * n, "cx": 16.0 - n,
                                "cy": 16.0, "background": f"bg_{name}.png"})
    for k, f in enumerate(meta["frames"]):
        f.update(camera=cameras[k % len(cameras)], timestep=k // len(cameras), frame_index=k // len(cameras))
    del meta["audio_features"], meta["background"]
    (root / "transforms.json").write_text(json.dumps(meta))
    return meta
