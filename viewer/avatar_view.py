"""`avatar view AVATAR`: the live studio in the browser (viser).

Frames are rendered server-side with our rasterizer from each browser tab's own camera
(as nerfstudio's viewer does) and streamed as JPEG backgrounds. While the camera moves
the resolution drops; it sharpens when the camera stops. Each tab has its own GUI:
speech playback (files from the command line or uploaded), render modes, torso and
background toggles, blink and mouth-amplitude controls, an FPS readout with the frame
time split into deform / rasterize / encode, PNG snapshots and mp4 recordings of the
camera path with the speech muxed in (the writer of `avatar render`). An avatar of a rig
shows the rig's cameras as frustums, each with its own lens; a click on one looks
through it.

The Speech panel's microphone (viewer/microphone.py) streams what the tab's microphone
hears to the server, which drives the avatar with it live (recon/live.py: causal
features and motion within the look-ahead, `--lookahead-ms`); the readout then gives the
sound-to-frame latency split into buffering, transit, queue, features, motion, deform,
rasterize and encode (LIVE_STAGES), measured from the moment the page got each chunk from
the browser's audio, on the server's clock (viewer/microphone.py: BrowserClock). The
display of the frame in the browser is not in it. Microphone audio is
kept in memory only, and written to disk only as a recording the user starts and stops
(Record while the microphone is on: the frames re-rendered along the camera path, with
what the microphone heard).
"""

from __future__ import annotations

import base64
import hashlib
import io
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
import torch

from avatar.errors import AvatarError
from avatar.io import atomic_path
from avatar.media import write_mp4
from recon.avatar_dir import load_avatar
from recon.conditioning import blink_schedule, speech_features
from recon.dataset import Dataset
from recon.live import STAGES, LiveFrame, LiveSpeech
from recon.method import HeadView, TrainedAvatar, coverage, torso_under
from recon.raster import rasterize
from recon.render import CameraRig, Drive, open_dataset

from .microphone import MicServer

MAX_UPLOAD_BYTES = 50 * 2**20
MAX_TRACK_SECONDS = 180.0
BRANCH_COLOURS = torch.tensor([[0.95, 0.75, 0.2], [0.9, 0.1, 0.35], [0.3, 0.6, 0.95]])  # face, mouth, torso
TORSO_CHOICES = {"3D": "3d", "capture's 2D": "frame", "none": "none"}
"""The Torso menu: what lies behind the head (as `avatar render --torso`)."""
SAMPLE_RATE = 16_000
HEAD_FILL = 0.7  # share of the view's height the head fills when a tab opens
LIVE_STAGES = ("buffering", "transit", *STAGES[1:])
"""A live frame's latency in the studio: recon/live.py's stages, the buffering counted
until the page got the chunk from the browser's audio, then its transit to the server."""
TARGET_FPS = 10.0  # the moving camera's frame rate the default resolution is chosen for


@dataclass
class Track:
    """A speech file prepared to drive the avatar."""

    name: str
    pcm: np.ndarray  # 16 kHz mono
    drive: Drive

    @property
    def key(self) -> str:
        """The audio's identity (caches are keyed on it, never on the file name)."""
        if not hasattr(self, "_key"):
            self._key = hashlib.sha1(np.ascontiguousarray(self.pcm).tobytes()).hexdigest()
        return self._key

    @property
    def seconds(self) -> float:
        return len(self.pcm) / SAMPLE_RATE


def load_track(path: Path, av: TrainedAvatar, name: str | None = None) -> Track:
    """Speech file -> Track; AvatarError for unreadable, silent or over-long audio."""
    try:
        pcm, feats = speech_features(path, av.fps, max_seconds=MAX_TRACK_SECONDS)
    except AvatarError as exc:
        if "is longer than" in exc.problem:
            raise AvatarError(path, f"is longer than {MAX_TRACK_SECONDS:.0f} s, the most the viewer plays",
                              "render long speech with `avatar render`") from exc
        raise
    drive = Drive(av.speech_motion(feats), np.ones(len(feats["mel"]), np.float32))
    return Track(name or Path(path).name, pcm, drive)


def track_from_upload(name: str, content: bytes, av: TrainedAvatar) -> Track:
    """An uploaded file -> Track (validated as load_track, plus size limits)."""
    if not content:
        raise AvatarError(Path(name), "is empty")
    if len(content) > MAX_UPLOAD_BYTES:
        raise AvatarError(Path(name), f"is {len(content) / 2**20:.0f} MB; uploads are limited to "
                          f"{MAX_UPLOAD_BYTES // 2**20} MB")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        path.write_bytes(content)
        return load_track(path, av, Path(name).name)


def head_extent(av: TrainedAvatar) -> tuple[torch.Tensor, float]:
    """(centre [3], height) of the head in world units: the 2nd-98th percentile of its
    points (TrainedAvatar.head_points) along the world's up axis (y), so stray points do
    not set the framing."""
    points = av.head_points()
    lo, hi = torch.quantile(points, torch.tensor([0.02, 0.98], device=points.device), dim=0)
    return ((lo + hi) / 2).cpu(), float(hi[1] - lo[1])  # host: the browser's camera


@dataclass
class ViewSettings:
    """What one tab asks the renderer for."""

    mode: str = "RGB"
    background: bool = True
    torso: str = "3d"
    """3d (the avatar's torso branch), frame (the capture's torso, 2D) or none."""
    mouth_scale: float = 1.0
    eye: float = 1.0


class FairLock:
    """A lock granted in the order it was asked for, so that tabs take turns: a plain lock
    promises no order, and a tab that renders back to back may take it again before the
    tabs already waiting."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def render_modes(av: TrainedAvatar) -> tuple[str, ...]:
    """The Mode menu: the composite, its depth and alpha, each of the head's layers alone,
    and (avatars of Gaussians) every Gaussian's centre coloured by branch."""
    return ("RGB", "depth", "alpha", *(f"{name} branch" for name in av.layer_names),
            *(("centres",) if av.has_gaussians else ()))


class ViewRenderer:
    """Renders an avatar into an arbitrary camera with the viewer's modes; thread-safe
    (one render at a time, in turn, so tabs share the cores instead of fighting over them).
    Cameras and the plate's warp are worked out on the host (the browser's camera, OpenCV);
    the avatar renders on its own device (load_avatar's), and frames come back to the host."""

    def __init__(self, av: TrainedAvatar):
        self.av = av
        self.device = av.background.device
        self.ds = open_dataset(av, av.size, required=False)
        self.rig = CameraRig(av, self.ds)
        self.lock = FairLock()
        self._torso = None
        if self.ds is not None:
            f = self.ds[0]
            self._torso = (f.image, f.masks["torso"])

    def under(self, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int,
              s: ViewSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What lies behind the head in this view: the avatar's 3D torso over the background
        plate; or the plate with the capture's torso pasted in (2D), as seen from the
        capture's mean camera, put on a plane through the head facing that camera and seen
        from this one, so the 2D torso stays under the neck when the view turns a little.
        Returns ([H, W, 3], the 3D torso's alpha [H, W, 1] or None)."""
        backdrop = self.backdrop(viewmat.cpu(), K.cpu(), width, height, s).to(self.device)  # host: OpenCV's warp
        if s.torso == "3d" and self.av.has_torso:
            layer = self.av.torso_layer(viewmat.to(self.device), K.to(self.device), (width, height), None)
            return torso_under(layer, backdrop), layer.alpha
        return backdrop, None

    def backdrop(self, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, s: ViewSettings) -> torch.Tensor:
        """The plate (with the capture's 2D torso when asked) seen from this view (see `under`)."""
        grey = np.full((self.av.size,) * 2 + (3,), 0.12, np.float32)
        plate = self.av.background.cpu().numpy() if s.background else grey  # host: OpenCV's warp
        if s.torso == "frame" and self._torso is not None:
            img, mask = self._torso
            plate = np.where(mask.cpu().numpy()[..., None], img.cpu().numpy(), plate)  # host: OpenCV's warp
        H = self.plate_homography(viewmat, K, width, height)
        plate = np.ascontiguousarray(plate)
        if H is None:  # the plane is behind this camera or edge-on: the plate as a flat backdrop
            return torch.from_numpy(cv2.resize(plate, (width, height), interpolation=cv2.INTER_AREA)).float()
        out = cv2.warpPerspective(plate, H, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REFLECT_101)
        return torch.from_numpy(out).float()

    def plate_homography(self, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int) -> np.ndarray | None:
        """[3, 3] map from this view's pixels to the plate's (capture's mean camera at the
        avatar's size), through the plane at the head's depth; None when a corner's ray
        misses the plane."""
        capture_w2c = self.rig.at(0.0, 0.0).double().cpu()  # host: OpenCV's homography
        c2w = torch.linalg.inv(viewmat.double().cpu())  # host: OpenCV's homography
        axis = capture_w2c[2, :3]  # the capture camera's viewing direction in world
        centre = -capture_w2c[:3, :3].T @ capture_w2c[:3, 3]
        plane_point = centre + self.rig.distance * axis
        corners = torch.tensor([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]], dtype=torch.float64,
                               device="cpu")  # host: OpenCV's homography
        rays = torch.cat([corners, torch.ones(4, 1, dtype=torch.float64, device="cpu")], 1) \
            @ torch.linalg.inv(K.double().cpu()).T  # host: OpenCV's homography
        dirs = rays @ c2w[:3, :3].T
        denom = dirs @ axis
        if bool((denom.abs() < 1e-6).any()):
            return None
        depth = ((plane_point - c2w[:3, 3]) @ axis) / denom
        if bool((depth <= 0).any()):
            return None
        points = c2w[:3, 3] + depth[:, None] * dirs
        cam = points @ capture_w2c[:3, :3].T + capture_w2c[:3, 3]
        pix = cam @ self.av.K.double().cpu().T  # host: OpenCV's homography
        pix = pix[:, :2] / pix[:, 2:]
        return cv2.getPerspectiveTransform(corners.numpy().astype(np.float32),  # host: OpenCV's homography
                                           pix.numpy().astype(np.float32))  # host: OpenCV's homography

    def intrinsics(self, fov_y: float, width: int, height: int) -> torch.Tensor:
        f = height / (2 * np.tan(fov_y / 2))
        return torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float32)

    def render(self, viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int, motion: torch.Tensor | None,
               s: ViewSettings) -> tuple[np.ndarray, dict[str, float]]:
        """viewmat [4, 4], K [3, 3] (on any device), motion [K] or None -> ([H, W, 3] uint8,
        timings in ms {deform, rasterize})."""
        av, dev = self.av, self.device
        eye = torch.tensor([[s.eye]], device=dev)
        motion = None if motion is None else motion.to(dev)[None]
        with self.lock, torch.no_grad():
            t0 = time.perf_counter()
            pose = av.deform(motion, eye, mouth_scale=s.mouth_scale)[0]
            t1 = time.perf_counter()
            under, torso_alpha = self.under(viewmat, K, width, height, s)
            viewmat, K = viewmat.to(dev), K.to(dev)
            if s.mode == "centres":
                g = av.gaussians(pose, torso=s.torso == "3d")
                colours = BRANCH_COLOURS.to(dev)[g.branch.long()]
                n = len(g)
                out = rasterize(g.means, torch.tensor([1.0, 0, 0, 0], device=dev).expand(n, 4),
                                torch.full((n, 3), 6e-4, device=dev), torch.ones(n, device=dev), colours, viewmat[None],
                                K[None], width, height, backend=av.config.backend)
                img = out.image[0] + (1 - out.alpha[0]) * under * 0.3
            else:
                view = av.render_head(pose, viewmat, K, (width, height))
                if s.mode.endswith(" branch"):
                    layer = view.layers[s.mode.removesuffix(" branch")]
                    img = layer.rgb + (1 - layer.alpha) * under
                elif s.mode == "alpha":  # head, or head or torso
                    alpha = view.alpha
                    if torso_alpha is not None:
                        alpha = coverage(alpha, torso_alpha)
                    img = alpha.expand(-1, -1, 3)
                elif s.mode == "depth":
                    img = self._depth(view)
                else:
                    img, _ = view.over(under)
            t2 = time.perf_counter()
        rgb = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()  # host: to the browser
        return rgb, {"deform": 1e3 * (t1 - t0), "rasterize": 1e3 * (t2 - t1)}

    @staticmethod
    def _depth(view: HeadView) -> torch.Tensor:
        depth = view.depth[..., 0]
        cover = view.alpha[..., 0] > 0.5
        if not cover.any():
            return torch.zeros(*depth.shape, 3, device=depth.device)
        lo, hi = torch.quantile(depth[cover], torch.tensor([0.02, 0.98], device=depth.device))
        d = ((depth - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        u8 = (255 * (1 - d)).to(torch.uint8).cpu().numpy()  # host: OpenCV's colour map
        col = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_TURBO), cv2.COLOR_BGR2RGB)
        return torch.from_numpy(col).to(depth.device).float() / 255 * cover[..., None]


@dataclass
class Playback:
    """The speech clock of one tab."""

    track: Track | None = None
    playing: bool = False
    speed: float = 1.0
    t0: float = 0.0  # track time at `wall0`
    wall0: float = 0.0

    def time(self) -> float:
        if self.track is None:
            return 0.0
        if not self.playing:
            return self.t0
        t = self.t0 + self.speed * (time.perf_counter() - self.wall0)
        if t >= self.track.seconds:
            self.playing, self.t0 = False, self.track.seconds
            return self.t0
        return t

    def seek(self, t: float) -> None:
        self.t0, self.wall0 = t, time.perf_counter()


def vertical_fov(K: torch.Tensor, height: int) -> float:
    """The vertical field of view (radians) of intrinsics K [3, 3] over an image `height` tall."""
    return 2 * float(np.arctan(height / (2 * float(K[1, 1]))))


def add_rig_frustums(scene, ds: Dataset | None, look_through) -> list[str]:
    """A rig's cameras (two or more) as frustums at their first views, each with its own
    field of view and that view's image; clicking one calls look_through(client, camera to
    world [4, 4] (OpenCV axes), vertical fov in radians). Returns the frustums' names."""
    import viser.transforms as vtf

    if ds is None or len(ds.cameras) < 2:
        return []
    names = []
    for c, cam in enumerate(ds.cameras):
        i = ds.views_of(c)[0]
        c2w = np.linalg.inv(ds.viewmat(i).cpu().double().numpy())
        fov_y = vertical_fov(cam.K, ds.size)
        image = (ds[i].image.cpu().numpy() * 255).astype(np.uint8)
        name = f"/rig/{cam.name}"
        frustum = scene.add_camera_frustum(name, fov=fov_y, aspect=1.0, scale=0.05, image=image, color=(255, 200, 40),
                                           wxyz=vtf.SO3.from_matrix(c2w[:3, :3]).wxyz, position=c2w[:3, 3])
        frustum.on_click(lambda event, c2w=c2w, fov_y=fov_y: look_through(event.client, c2w, fov_y))
        names.append(name)
    return names


@dataclass
class LiveTake:
    """What the microphone gave while recording: its audio from stream sample `audio_from`
    (the first chunk's; None before it), and every live frame's motion codes and eye
    openness, by frame index. In memory; written only as the recording's mp4, when the user
    stops it."""

    audio_from: int | None = None
    audio: list[np.ndarray] = field(default_factory=list)
    codes: dict[int, torch.Tensor] = field(default_factory=dict)
    eyes: dict[int, float] = field(default_factory=dict)


@dataclass
class Recording:
    """The camera of every frame shown while recording, by frame index (of the track, or of
    the microphone's stream: `live`)."""

    cameras: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]] = field(default_factory=dict)
    live: LiveTake | None = None


class ClientSession:
    """One browser tab: its GUI, camera, clock and render loop (its own thread)."""

    def __init__(self, studio: "Studio", client):
        self.studio, self.client = studio, client
        self.settings = ViewSettings(torso="3d" if studio.renderer.av.has_torso else "frame")
        self.play = Playback(track=next(iter(studio.tracks.values()), None))
        self.blink_at = -1.0
        self.auto_blinks = True
        self.dirty = True
        self.last_move = 0.0
        self.sharp = False
        self.recording: Recording | None = None
        self.recording_lock = threading.Lock()  # the microphone's thread adds to a live take
        self.stats = {"fps": 0.0}
        self.frames_sent = 0
        self.alive = True
        self.camera_placed = False
        """Whether the browser has reported the camera this session placed on the face (or
        a camera moved from it)."""
        self.live: LiveSpeech | None = None  # while the microphone streams
        # newest: (frame, its chunk's capture in the page, arrival, ready)
        self.live_frame: tuple[LiveFrame, float, float, float] | None = None
        self.live_start = 0.0  # the stream's clock origin: when its first sample was spoken
        self.live_shown = -1  # the live frame last rendered
        self.latency: list[dict] = []  # per live frame shown, milliseconds by stage (the last 200)
        self._browser_default = np.asarray(client.camera.position).copy()  # its camera before ours
        self._build_gui()
        self._place_camera()
        client.camera.on_update(self._camera_moved)
        self.thread = threading.Thread(target=self._loop, name=f"viewer-client-{client.client_id}", daemon=True)
        self.thread.start()

    # -- GUI ---------------------------------------------------------------------------
    def _build_gui(self) -> None:
        gui = self.client.gui
        studio = self.studio
        with gui.add_folder("Speech"):
            self.track_menu = gui.add_dropdown("Track", tuple(studio.tracks) or ("(none)",),
                                               initial_value=self.play.track.name if self.play.track else "(none)")
            self.upload = gui.add_upload_button("Upload speech", icon=None, mime_type="audio/*",
                                                hint="wav, mp3 or flac with speech, up to 3 minutes")
            self.play_button = gui.add_button("Play")
            self.pause_button = gui.add_button("Pause")
            self.scrub = gui.add_slider("Time (s)", 0.0, max(self.play.track.seconds if self.play.track else 1.0, 0.1),
                                        0.04, 0.0)
            self.speed = gui.add_slider("Speed", 0.25, 2.0, 0.25, 1.0)
            self.audio_html = gui.add_html("")
            self.mic_html = gui.add_html(f'<iframe src="{studio.mic.page_url(self.client.client_id)}" '
                                         'allow="microphone" title="microphone" '
                                         'style="border:0;width:100%;height:34px"></iframe>')
        with gui.add_folder("Render"):
            self.mode = gui.add_dropdown("Mode", render_modes(studio.av), initial_value="RGB")
            self.background = gui.add_checkbox("Background", True)
            torsos = [k for k, v in TORSO_CHOICES.items() if v != "3d" or self.settings.torso == "3d"]
            self.torso = gui.add_dropdown("Torso", torsos, initial_value=torsos[0])
            self.mouth_amp = gui.add_slider("Mouth amplitude", 0.0, 2.0, 0.05, 1.0)
            self.eye = gui.add_slider("Eye openness", 0.0, 1.0, 0.05, 1.0)
            self.auto_blink = gui.add_checkbox("Natural blinks", True)
            self.blink_button = gui.add_button("Blink")
            self.max_res = gui.add_slider("Resolution", 64, studio.max_resolution, 16, studio.default_resolution)
        with gui.add_folder("Output"):
            self.snapshot_button = gui.add_button("Snapshot (PNG)")
            self.record_button = gui.add_button("Record")
        self.stats_md = gui.add_markdown("")

        def changed(_=None) -> None:
            s = self.settings
            s.mode, s.background, s.torso = self.mode.value, self.background.value, TORSO_CHOICES[self.torso.value]
            s.mouth_scale, self.auto_blinks = float(self.mouth_amp.value), self.auto_blink.value
            self.dirty = True

        for h in (self.mode, self.background, self.torso, self.mouth_amp, self.eye, self.auto_blink, self.max_res):
            h.on_update(changed)
        self.track_menu.on_update(lambda _: self._select(self.track_menu.value))
        self.upload.on_upload(lambda _: self.studio.start_upload(self, self.upload.value))
        self.play_button.on_click(lambda _: self.start())
        self.pause_button.on_click(lambda _: self.pause())
        self.scrub.on_update(self._scrubbed)
        self.speed.on_update(self._speed)
        self.blink_button.on_click(lambda _: setattr(self, "blink_at", time.perf_counter()))
        self.snapshot_button.on_click(lambda _: self.studio.pool(self.snapshot))
        self.record_button.on_click(lambda _: self._toggle_record())

    def _select(self, name: str) -> None:
        if name in self.studio.tracks:
            self.play.track = self.studio.tracks[name]
            self.play.playing = False
            self.play.seek(0.0)
            self.scrub.max = max(self.play.track.seconds, 0.1)
            self.scrub.value = 0.0
            self._audio_tag(False)
            self.dirty = True

    def add_track(self, track: Track) -> None:
        self.track_menu.options = tuple(self.studio.tracks)
        self.track_menu.value = track.name
        self._select(track.name)

    # -- live speech (the microphone) -------------------------------------------------------
    def live_on(self, streaming: bool) -> None:
        """The tab's microphone stream opened (playback pauses) or closed."""
        if streaming:
            self.pause()
            self.live_frame, self.live_shown, self.latency = None, -1, []
            self.live = LiveSpeech(self.studio.av, self.studio.lookahead_s, self.studio.prior_mel)
        else:
            self.live = None
            if self.recording is not None and self.recording.live is not None:  # the take ends with the stream
                self._toggle_record()
        self.dirty = True

    def hear(self, pcm: np.ndarray, captured: float | None = None) -> None:
        """A chunk of the microphone (called from the microphone's thread); `captured`: when
        the page got it from the browser's audio, on time.perf_counter() (None: unknown,
        taken as its arrival here)."""
        live = self.live
        if live is None:
            return
        arrived = time.perf_counter()
        captured = arrived if captured is None else min(captured, arrived)
        heard = (live.stream.received + len(pcm)) / SAMPLE_RATE  # stream seconds once this chunk is in
        # The stream's clock: a chunk cannot be captured before its last sample was spoken,
        # so the earliest capture minus the audio it completes is the best guess of when it began.
        self.live_start = captured - heard if live.stream.received == 0 else min(self.live_start, captured - heard)
        frames = live.push(pcm)
        if frames:
            self.live_frame = (frames[-1], captured, arrived, time.perf_counter())
        with self.recording_lock:  # a chunk and its frames join a take whole, or not at all
            take = self.recording.live if self.recording is not None else None
            if take is not None:
                if take.audio_from is None:
                    take.audio_from = live.stream.received - len(pcm)
                take.audio.append(pcm)
                for f in frames:
                    take.codes[f.index], take.eyes[f.index] = f.codes, f.eye

    def start(self) -> None:
        if self.live is not None:
            self.client.add_notification("Microphone on", "Stop the microphone to play a speech file.",
                                         color="yellow", auto_close_seconds=4)
            return
        if self.play.track is None:
            self.client.add_notification("No speech", "Pick or upload a speech file first.", color="yellow",
                                         auto_close_seconds=4)
            return
        t = 0.0 if self.play.time() >= self.play.track.seconds - 1e-3 else self.play.time()
        self.play.seek(t)
        self.play.playing = True
        self._audio_tag(True)

    def pause(self) -> None:
        self.play.seek(self.play.time())
        self.play.playing = False
        self._audio_tag(False)
        self.dirty = True

    def _scrubbed(self, _=None) -> None:
        if abs(self.scrub.value - self.play.time()) > 0.06:  # a user drag, not our own update
            self.play.seek(float(self.scrub.value))
            if self.play.playing:
                self._audio_tag(True)
            self.dirty = True

    def _speed(self, _=None) -> None:
        self.play.seek(self.play.time())
        self.play.speed = float(self.speed.value)
        if self.play.playing:
            self._audio_tag(True)

    def _audio_tag(self, playing: bool) -> None:
        """Browser-side audio in step with the server clock, where the browser allows
        autoplay (after a click on the page it does). Muted at speeds other than 1."""
        track = self.play.track
        if not playing or track is None or abs(self.play.speed - 1.0) > 1e-6:
            self.audio_html.content = ""
            return
        self.audio_html.content = (f'<audio autoplay src="data:audio/wav;base64,{self.studio.wav_b64(track)}'
                                   f'#t={self.play.time():.2f}"></audio>')

    # -- camera ------------------------------------------------------------------------
    def _place_camera(self) -> None:
        """Open on the face: the capture's mean viewpoint, at the distance where the head
        (hair to chin) fills HEAD_FILL of the view's height, or nearer, so that the view
        stays inside what the capture saw (the plate and the torso come from there)."""
        rig = self.studio.renderer.rig
        cam = self.client.camera
        cam.fov = float(self.studio.fov_y)
        cam.up_direction = (0.0, 1.0, 0.0)
        centre, height = self.studio.head
        distance = min(height / (HEAD_FILL * 2 * np.tan(self.studio.fov_y / 2)), 0.95 * rig.distance)
        cam.position = (centre + distance * rig.base_dir.cpu()).numpy().astype(np.float64)  # host: the browser's
        cam.look_at = centre.numpy().astype(np.float64)  # after position: it re-aims the camera

    def look_through(self, c2w: np.ndarray, fov_y: float) -> None:
        """Put the tab's camera where a rig camera is (camera to world [4, 4], OpenCV axes)."""
        import viser.transforms as vtf

        cam = self.client.camera
        cam.fov = fov_y
        cam.position = c2w[:3, 3].astype(np.float64)
        cam.wxyz = vtf.SO3.from_matrix(c2w[:3, :3]).wxyz  # after position: it aims the camera
        self.camera_placed = True
        self.dirty = True

    def _camera_moved(self, _=None) -> None:
        # A page still loading may drop the placement and report its own default camera
        # again: place it again until the browser reports another camera.
        if not self.camera_placed:
            if np.allclose(np.asarray(self.client.camera.position), self._browser_default, atol=1e-6):
                self._place_camera()
            else:
                self.camera_placed = True
        self.last_move = time.perf_counter()
        self.dirty = True

    def view(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(viewmat, K, width, height) of the tab's camera at `resolution` on the long side."""
        import viser.transforms as vtf

        cam = self.client.camera
        aspect = float(cam.aspect) if cam.aspect else 1.0
        width, height = (resolution, max(16, int(resolution / aspect))) if aspect >= 1 else \
            (max(16, int(resolution * aspect)), resolution)
        width, height = width - width % 2, height - height % 2
        R = vtf.SO3(np.asarray(cam.wxyz)).as_matrix()  # camera-to-world, OpenCV axes
        w2c = np.eye(4)
        w2c[:3, :3] = R.T
        w2c[:3, 3] = -R.T @ np.asarray(cam.position)
        K = self.studio.renderer.intrinsics(float(cam.fov), width, height)
        return torch.from_numpy(w2c).float(), K, width, height

    # -- frames --------------------------------------------------------------------------
    def eye_now(self, t: float, natural: float | None = None) -> float:
        """The eye openness now: the slider's, closed by a blink the button started, else by
        the natural blinks (`natural`, or the track's at playback time t)."""
        eye = float(self.eye.value)
        now = time.perf_counter()
        if 0 <= now - self.blink_at < 0.25:
            eye = min(eye, 0.5 + 0.5 * np.cos(2 * np.pi * (now - self.blink_at) / 0.25))
        elif self.auto_blinks and natural is not None:
            eye = min(eye, natural)
        elif self.auto_blinks and self.play.track is not None:
            sched = self.studio.blinks(self.play.track)
            eye = min(eye, float(sched[min(int(t * self.studio.av.fps), len(sched) - 1)]))
        return eye

    def frame_index(self, t: float) -> int | None:
        if self.play.track is None:
            return None
        return min(int(t * self.studio.av.fps), len(self.play.track.drive) - 1)

    def render_now(self, resolution: int, live: tuple[LiveFrame, float, float, float] | None = None
                   ) -> tuple[np.ndarray, dict]:
        """The tab's frame now: the track's at the playback time, or with the microphone on,
        the live frame `live` (default: the newest)."""
        if self.live is not None:
            live = live or self.live_frame
            frame = live[0] if live is not None else None
            self.settings.eye = self.eye_now(0.0, 1.0 if frame is None else frame.eye)
            view = self.view(resolution)
            rec = self.recording
            if rec is not None and frame is not None:
                rec.cameras[frame.index] = view
            return self.studio.renderer.render(*view, None if frame is None else frame.codes, self.settings)
        t = self.play.time()
        k = self.frame_index(t)
        motion = self.play.track.drive.codes(k) if k is not None else None
        self.settings.eye = self.eye_now(t)
        viewmat, K, width, height = self.view(resolution)
        if self.recording is not None and self.play.playing and k is not None:
            self.recording.cameras[k] = (viewmat, K, width, height)
        return self.studio.renderer.render(viewmat, K, width, height, motion, self.settings)

    def _loop(self) -> None:
        studio = self.studio
        while self.alive and studio.running:
            moving = time.perf_counter() - self.last_move < 0.3
            live = self.live_frame if self.live is not None else None
            animating = self.play.playing or time.perf_counter() - self.blink_at < 0.3 or \
                (live is not None and live[0].index != self.live_shown)
            if not (self.dirty or animating or (not moving and not self.sharp)):
                time.sleep(0.01)
                continue
            full = int(self.max_res.value)
            resolution = max(64, full // 2) if (moving or animating) else full
            self.dirty = False
            self.sharp = not (moving or animating)
            t0 = time.perf_counter()
            try:
                rgb, timings = self.render_now(resolution, live)
                t1 = time.perf_counter()
                if not self.alive:
                    return
                self.client.scene.set_background_image(rgb, format="jpeg", jpeg_quality=85)
                self.frames_sent += 1
                timings["encode"] = 1e3 * (time.perf_counter() - t1)
                if live is not None and live[0].index != self.live_shown:
                    self._live_shown(live, t0, timings)
            except Exception as exc:  # a tab that closed mid-frame: stop this loop only
                if self.alive and studio.running and self.client.client_id in studio.sessions:
                    studio.log(f"client {self.client.client_id}: frame failed ({exc.__class__.__name__}: {exc})")
                    time.sleep(0.2)
                    continue
                return
            dt = time.perf_counter() - t0
            self.stats = {"fps": 1 / max(dt, 1e-6), "resolution": rgb.shape[:2], **timings}
            if self.play.playing:
                self.scrub.value = round(self.play.time(), 2)
            self.stats_md.content = (f"**{self.stats['fps']:.1f} FPS** at {rgb.shape[1]}x{rgb.shape[0]} · "
                                     f"deform {timings['deform']:.0f} ms · rasterize {timings['rasterize']:.0f} ms · "
                                     f"encode {timings['encode']:.0f} ms" + self._latency_line())

    def _live_shown(self, live: tuple[LiveFrame, float, float, float], started: float, timings: dict) -> None:
        """Log the sound-to-frame latency of a live frame just sent, by stage (ms): LIVE_STAGES."""
        frame, captured, arrived, ready = live
        sound = self.live_start + frame.index / self.studio.av.fps
        self.live_shown = frame.index
        self.latency = self.latency[-199:] + [{
            "total": 1e3 * (time.perf_counter() - sound), "buffering": 1e3 * (captured - sound),
            "transit": 1e3 * (arrived - captured), "queue": 1e3 * (started - ready), **frame.ms, **timings}]

    def _latency_line(self) -> str:
        live = self.live  # the microphone's thread may end the stream meanwhile
        if live is None or not self.latency:
            return ""
        med = {k: float(np.median([r[k] for r in self.latency])) for k in ("total", *LIVE_STAGES)}
        return (f"  \n**live: sound to frame {med['total']:.0f} ms** (median of {len(self.latency)}) · "
                + " · ".join(f"{k} {med[k]:.0f}" for k in LIVE_STAGES) + f"  \nmotion: {live.motion_note}")

    # -- outputs -------------------------------------------------------------------------
    def snapshot(self) -> Path:
        rgb, _ = self.render_now(int(self.max_res.value))
        path = self.studio.output_path("snapshots", "png")
        with atomic_path(path) as tmp:
            cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.client.send_file_download(path.name, path.read_bytes())
        self.client.add_notification("Snapshot saved", str(path), auto_close_seconds=5)
        return path

    def _toggle_record(self) -> None:
        """Start a recording (of the track's playback, or with the microphone on, of what it
        hears), or stop one and save it."""
        if self.recording is None:
            live = self.live
            self.recording = Recording(live=LiveTake() if live is not None else None)
            self.record_button.label = "Stop recording"
            if live is None:
                self.start()
        else:
            with self.recording_lock:
                rec, self.recording = self.recording, None
            self.record_button.label = "Record"
            self.studio.pool(lambda: self.save_recording(rec))

    def save_recording(self, rec: Recording) -> Path | None:
        """The recorded camera path, re-rendered at every video frame, with its speech (the
        track's, or what the microphone heard)."""
        fps = self.studio.av.fps
        track, take = self.play.track, rec.live
        if take is not None:  # frames the take has the sound of: heard once Record was pressed
            start = 0 if take.audio_from is None else take.audio_from
            rec.cameras = {k: v for k, v in rec.cameras.items() if k in take.codes and k / fps * SAMPLE_RATE >= start}
        if (track is None and take is None) or not rec.cameras:
            self.client.add_notification("Nothing recorded", "Press Record, let the speech play (or speak), press "
                                         "Stop.", color="yellow", auto_close_seconds=5)
            return None
        first, last = min(rec.cameras), max(rec.cameras)
        note = self.client.add_notification("Recording", f"rendering {last - first + 1} frames", loading=True,
                                            with_close_button=False)
        if take is None:
            codes, eyes = track.drive.codes, self.studio.blinks(track)
            audio, audio_from = track.pcm, 0
        else:  # every frame the stream gave, a gap (none expected) holding the frame before it
            known = sorted(take.codes)

            def given(k: int) -> int:
                return known[max(int(np.searchsorted(known, k, "right")) - 1, 0)]

            codes = lambda k: take.codes[given(k)]  # noqa: E731
            eyes = {k: take.eyes[given(k)] for k in range(first, last + 1)}
            audio, audio_from = np.concatenate(take.audio), take.audio_from

        def frames():
            cam = rec.cameras[first]
            for k in range(first, last + 1):
                cam = rec.cameras.get(k, cam)
                s = ViewSettings(**{**self.settings.__dict__, "eye": float(eyes[k])})
                yield self.studio.renderer.render(*cam[:2], cam[2], cam[3], codes(k), s)[0]

        pcm = audio[max(int(first / fps * SAMPLE_RATE) - audio_from, 0): max(int((last + 1) / fps * SAMPLE_RATE)
                                                                          - audio_from, 0)]
        path = write_mp4(self.studio.output_path("recordings", "mp4"), frames(), fps, audio=pcm)
        note.remove()
        self.client.send_file_download(path.name, path.read_bytes())
        self.client.add_notification("Recording saved", str(path), auto_close_seconds=5)
        return path


class Studio:
    """The viewer server: one avatar, shared speech tracks, one session per browser tab."""

    def __init__(self, avatar: str | Path, audio: list[Path] = (), host: str = "127.0.0.1", port: int = 8080,
                 resolution: int | None = None, verbose: bool = True, device: torch.device | str = "cpu",
                 lookahead_s: float = 0.08):
        import viser

        self.av = load_avatar(avatar, device)
        self.renderer = ViewRenderer(self.av)
        self.lookahead_s = lookahead_s
        self.prior_mel = None if self.renderer.ds is None else self.renderer.ds.features.get("mel")
        """The subject's speech: the live normalisation's prior."""
        self.tracks: dict[str, Track] = {}
        self._lock = threading.Lock()
        for path in audio:
            self.add_track(load_track(Path(path), self.av))
        self.fov_y = vertical_fov(self.av.K, self.av.size)
        self.head = head_extent(self.av)
        # Frames render with the avatar's rasterizer backend on `device`. Default: the
        # resolution a moving camera renders at about TARGET_FPS on this machine (measured
        # now); a resting camera renders at twice it.
        self.max_resolution = 1024
        self.default_resolution = resolution or self.measure_resolution()
        self.verbose = verbose
        self.sessions: dict[int, ClientSession] = {}
        self._blinks: dict[str, np.ndarray] = {}
        self._wav: dict[str, str] = {}
        self._counter = 0
        self.running = True
        self.mic = MicServer(host, self._mic_audio, self._mic_state)
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.server.scene.set_up_direction("+y")
        self.server.gui.configure_theme(control_width="large")
        self.server.gui.main_panel.dock_right()  # the panel beside the view, not over the face
        self.rig_cameras = add_rig_frustums(self.server.scene, self.renderer.ds, self._look_through)
        self.server.on_client_connect(self._connect)
        self.server.on_client_disconnect(self._disconnect)

    def measure_resolution(self) -> int:
        """The resting resolution (long side) whose half, the moving one, renders at about
        TARGET_FPS: render time is fitted as a + b * pixels to the median of three timed
        frames at two sizes; the training size when the timings make no sense (a busy
        machine)."""
        viewmat = self.renderer.rig.at(0, 0)
        times = {}
        for side in (128, 256):
            K = self.renderer.intrinsics(self.fov_y, side, side)
            self.renderer.render(viewmat, K, side, side, None, ViewSettings())  # warm-up (kernel load, caches)
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                self.renderer.render(viewmat, K, side, side, None, ViewSettings())
                runs.append(time.perf_counter() - t0)
            times[side] = float(np.median(runs))
        b = (times[256] - times[128]) / (256**2 - 128**2)
        if b <= 0:
            return self.av.size
        a = max(times[128] - b * 128**2, 0.0)
        moving = int(np.sqrt(max(1 / TARGET_FPS - a, 0.0) / b))  # side of a square view
        return int(np.clip(2 * moving // 16 * 16, 128, self.max_resolution))

    @property
    def url(self) -> str:
        return f"http://{self.server.get_host()}:{self.server.get_port()}"

    def log(self, text: str) -> None:
        if self.verbose:
            print(f"avatar view: {text}", flush=True)

    def _connect(self, client) -> None:
        self.sessions[client.client_id] = ClientSession(self, client)

    def _look_through(self, client, c2w: np.ndarray, fov_y: float) -> None:
        session = self.sessions.get(client.client_id)
        if session is not None:
            session.look_through(c2w, fov_y)

    def _disconnect(self, client) -> None:
        session = self.sessions.pop(client.client_id, None)
        self.mic.forget(client.client_id)
        if session is not None:
            session.alive = False

    def _mic_state(self, tab: int, streaming: bool) -> None:
        session = self.sessions.get(tab)
        if session is not None:
            try:
                session.live_on(streaming)
            except AvatarError as exc:  # an avatar that speech cannot drive
                session.client.add_notification("Microphone refused", str(exc), color="red", auto_close_seconds=8)
                return
            self.log(f"client {tab}: microphone {'on' if streaming else 'off'}")

    def _mic_audio(self, tab: int, pcm: np.ndarray, captured: float | None) -> None:
        session = self.sessions.get(tab)
        if session is not None:
            session.hear(pcm, captured)

    def pool(self, fn) -> None:
        threading.Thread(target=fn, daemon=True).start()

    def blinks(self, track: Track) -> np.ndarray:
        if track.key not in self._blinks:
            self._blinks[track.key] = blink_schedule(len(track.drive), self.av.fps)
        return self._blinks[track.key]

    def wav_b64(self, track: Track) -> str:
        if track.key not in self._wav:
            buf = io.BytesIO()
            sf.write(buf, track.pcm, SAMPLE_RATE, format="WAV", subtype="PCM_16")
            self._wav[track.key] = base64.b64encode(buf.getvalue()).decode()
        return self._wav[track.key]

    def add_track(self, track: Track) -> Track:
        """Offer a track to every tab. The same audio under the same name is the same
        track; other audio under a name already taken gets a numbered name."""
        with self._lock:
            base, n = track.name, 1
            while track.name in self.tracks and self.tracks[track.name].key != track.key:
                n += 1
                stem, dot, ext = base.rpartition(".")
                track.name = f"{stem} ({n}).{ext}" if dot else f"{base} ({n})"
            self.tracks[track.name] = track
        return track

    def output_path(self, kind: str, ext: str) -> Path:
        with self._lock:
            self._counter += 1
            stamp = time.strftime("%Y%m%d-%H%M%S")
            return self.av.root / kind / f"{kind[:-1]}_{stamp}_{self._counter:03d}.{ext}"

    def start_upload(self, session: ClientSession, upload) -> None:
        """Compute features of an uploaded file in the background; refuse bad files in the GUI."""
        def work() -> None:
            note = session.client.add_notification("Speech upload", f"computing features of {upload.name}",
                                                   loading=True, with_close_button=False)
            try:
                track = track_from_upload(upload.name, upload.content, self.av)
            except AvatarError as exc:
                note.remove()
                session.client.add_notification("Upload refused", str(exc), color="red", auto_close_seconds=10)
                return
            except Exception as exc:  # anything a decoder throws: refuse the file, keep serving
                note.remove()
                session.client.add_notification("Upload refused", f"{upload.name}: {exc}", color="red",
                                                auto_close_seconds=10)
                return
            note.remove()
            track = self.add_track(track)
            session.add_track(track)
            session.client.add_notification("Speech ready", f"{track.name}: {track.seconds:.1f} s",
                                            auto_close_seconds=4)

        self.pool(work)

    def stop(self) -> None:
        self.running = False
        for s in list(self.sessions.values()):
            s.alive = False
        self.server.stop()
        self.mic.stop()


def run_avatar_viewer(avatar: Path, audio: list[Path], host: str, port: int, resolution: int | None,
                      device: torch.device | str = "cpu", lookahead_s: float = 0.08) -> int:
    studio = Studio(avatar, audio, host, port, resolution, device=device, lookahead_s=lookahead_s)
    print(f"avatar view: {avatar} at {studio.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        studio.stop()
    return 0
