"""A small synthetic dataset folder (format avatar-dataset/1) for the reader's and the
validator's tests."""

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
