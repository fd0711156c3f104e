"""`avatar view AVATAR`: the studio served on loopback and driven by a real headless Chromium."""

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.errors import AvatarError
from test_viewer_dataset import free_port

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags this sandboxed machine needs (no GPU, no background network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 640}


@pytest.fixture(scope="module")
def lively_avatar(trained_avatar, tmp_path_factory):
    """The tiny trained avatar with visibly speech-driven heads: 60 training steps leave the
    zero-initialised deformation outputs nearly still, so the test gives them weights that
    move the Gaussians by millimetres with the speech (the viewer is under test, not training)."""
    from recon.avatar_dir import CHECKPOINT
    from recon.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path_factory.mktemp("lively") / "avatar"
    shutil.copytree(trained_avatar, out)
    tensors, meta = load_checkpoint(out / CHECKPOINT)
    g = torch.Generator().manual_seed(0)
    for head in ("face_deform", "mouth_deform"):
        w = tensors[f"{head}.out.4.weight"]
        tensors[f"{head}.out.4.weight"] = 0.02 * torch.randn(w.shape, generator=g)
    tensors["motion_net.temporal.6.weight"] *= 10  # motion codes that differ from frame to frame
    save_checkpoint(out / CHECKPOINT, tensors, meta)
    from recon.live import ensure_live_motion

    ensure_live_motion(out, progress=False)  # the live motion net of this motion net (the old one is stale)
    return out


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory):
    """30 s of speech: playback outlasts the screenshots taken while it plays, even on a
    busy machine."""
    import soundfile as sf

    from scenes.speech import synthesize

    path = tmp_path_factory.mktemp("long") / "long_speech.wav"
    sf.write(path, synthesize(30.0, seed=9).pcm, 16000)
    return path


@pytest.fixture()
def studio(lively_avatar, long_speech):
    from viewer.avatar_view import Studio

    s = Studio(lively_avatar, [long_speech], port=free_port(), resolution=128, verbose=False)
    yield s
    s.stop()


def wait_for(cond, timeout=60.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def move_camera(session, position, tries: int = 5) -> None:
    """Move a tab's camera from the server and wait until its browser reports it there.
    The server's copy changes at once, but a report the browser sent before it got the
    move can still arrive and put the old camera back: so wait for a report that arrived
    after the move with the new position, and move again if none did. (viser swaps in a
    new camera state object for each report from the browser; its own setter mutates the
    one it has, and stamps its update time too, so neither the time nor our camera
    callback, which viser runs later on a thread pool, can tell a report from the move.)"""
    camera = session.client.camera
    target = np.asarray(position, dtype=np.float64)
    for attempt in range(tries):
        if attempt:  # viser sends nothing for a position its copy already holds
            camera.position = target + 1e-3
        camera.position = target
        moved = camera._state
        end = time.time() + 5.0
        while time.time() < end:
            if camera._state is not moved and np.allclose(np.asarray(camera.position), target, atol=1e-5):
                return
            time.sleep(0.05)
    raise AssertionError(f"the browser never reported the camera moved to {target}")


def screenshot(page) -> np.ndarray:
    import cv2

    png = page.screenshot()
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def open_tab(browser, studio):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(studio.url)
    page.get_by_text("Connected").wait_for(timeout=30_000)
    n = len(studio.sessions)
    wait_for(lambda: any(s.stats["fps"] > 0 for s in studio.sessions.values()), what="a first frame")
    return page, n


def settle(session, seconds=1.0):
    """Wait until the tab's render loop has produced its sharp, still frame."""
    wait_for(lambda: session.sharp and not session.dirty, what="a still frame")
    time.sleep(seconds)  # the browser shows the last JPEG


VIEW = (slice(160, 620), slice(20, 590))  # the canvas left of the GUI panel, below the notifications


def stable_shots(page, timeout=20.0):
    """Two consecutive screenshots of the canvas that agree: the browser has finished
    showing (and fading in) the latest frame."""
    end = time.time() + timeout
    prev = screenshot(page)[VIEW]
    while time.time() < end:
        time.sleep(0.5)
        cur = screenshot(page)[VIEW]
        if np.abs(cur.astype(int) - prev.astype(int)).mean() < 0.5:
            return prev, cur
        prev = cur
    raise AssertionError("the page never showed a still frame")


def test_page_loads_frames_arrive_and_follow_the_camera(browser, studio):
    page, _ = open_tab(browser, studio)
    session = next(iter(studio.sessions.values()))
    session.settings.background = False  # flat grey behind the head: avatar pixels stand out
    session.dirty = True
    settle(session)
    shot = stable_shots(page)[1]
    grey = np.array([31, 31, 31])
    avatar_pixels = (np.abs(shot.astype(int) - grey).sum(-1) > 40).mean()
    assert avatar_pixels > 0.05, f"only {avatar_pixels:.1%} of the viewport differs from the background"
    # Orbit with the mouse: the rendered view changes.
    page.mouse.move(300, 330)
    page.mouse.down()
    page.mouse.move(420, 300, steps=8)
    page.mouse.up()
    wait_for(lambda: time.perf_counter() - session.last_move < 5, what="a camera update")
    settle(session)
    moved = stable_shots(page)[1]
    assert np.abs(moved.astype(int) - shot.astype(int)).mean() > 2.0
    assert session.stats["fps"] > 0 and {"deform", "rasterize", "encode"} <= set(session.stats)
    # Snapshot: a PNG of the current view lands in the avatar folder.
    page.get_by_role("button", name="Snapshot (PNG)").click()
    snaps = studio.av.root / "snapshots"
    wait_for(lambda: snaps.is_dir() and list(snaps.glob("*.png")), what="the snapshot")
    page.close()


def canvas_box(page) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the 3D view in the page (the GUI panel is docked beside it)."""
    r = page.evaluate("(() => { const r = document.querySelector('canvas').getBoundingClientRect();"
                      " return [r.left, r.top, r.right, r.bottom]; })()")
    return tuple(int(round(v)) for v in r)


def test_first_screen_is_framed_on_the_face(browser, studio):
    """The studio opens on the face: the face fills at least a third of the view's height,
    centred, with the torso under it and nothing of the view hidden by the GUI."""
    from avatar.dataset_format import FACE_OVAL

    page, _ = open_tab(browser, studio)
    session = next(iter(studio.sessions.values()))
    settle(session)
    x0, y0, x1, y1 = canvas_box(page)
    assert x1 <= VIEWPORT["width"] * 0.7 and y1 - y0 >= VIEWPORT["height"] * 0.95  # the panel is beside the view
    assert session.settings.torso != "none" and session.torso.value != "none"  # a torso is on
    # Where the face is, from the tab's own camera: the mesh's face oval projected.
    viewmat, K, width, height = session.view(256)
    oval = studio.av.model.rig.vertices[list(FACE_OVAL)]
    cam = oval @ viewmat[:3, :3].T + viewmat[:3, 3]
    pix = (cam @ K.T)[:, :2] / (cam @ K.T)[:, 2:]
    assert (pix[:, 1].max() - pix[:, 1].min()) / height >= 1 / 3
    assert abs(float(pix[:, 0].mean()) / width - 0.5) < 0.15 and abs(float(pix[:, 1].mean()) / height - 0.5) < 0.15
    # And on screen: the head's alpha, screenshotted, is that tall, in the middle column.
    session.settings.mode = "alpha"
    session.dirty = True
    settle(session)
    shot = screenshot(page)[y0:y1, x0:x1]
    rows, cols = np.nonzero(shot.mean(-1) > 128)
    assert (rows.max() - rows.min()) / (y1 - y0) >= 1 / 3
    assert abs(cols.mean() / (x1 - x0) - 0.5) < 0.15
    page.close()


def test_two_tabs_have_their_own_cameras(browser, studio):
    a, _ = open_tab(browser, studio)
    b = browser.new_page(viewport=VIEWPORT)
    b.goto(studio.url)
    wait_for(lambda: len(studio.sessions) == 2 and all(s.stats["fps"] > 0 and s.camera_placed
                                                        for s in studio.sessions.values()),
             what="two served tabs, their cameras placed")
    first, second = list(studio.sessions.values())
    move_camera(second, second.client.camera.position + np.array([0.2, 0.0, 0.0]))
    assert not np.allclose(first.client.camera.position, second.client.camera.position)
    # Closing one tab mid-stream leaves the other served.
    b.close()
    wait_for(lambda: len(studio.sessions) == 1, what="the closed tab to leave")
    frames_before = first.stats.copy()
    first.dirty = True
    wait_for(lambda: first.stats is not frames_before and first.stats["fps"] > 0, what="the other tab's next frame")
    a.close()


def test_playing_speech_moves_the_mouth(browser, studio):
    page, _ = open_tab(browser, studio)
    session = next(iter(studio.sessions.values()))
    session.auto_blinks = False  # only the audio drives the face
    settle(session)
    still = stable_shots(page)
    page.get_by_role("button", name="Play").click()
    wait_for(lambda: session.play.playing, what="playback to start")
    shots = []
    while session.play.playing and len(shots) < 8:
        time.sleep(0.2)
        shots.append(screenshot(page)[VIEW].astype(int))
    assert len(shots) >= 4, "the track ended before the screenshots were taken"
    # How far each later screenshot moved from the first (robust to a browser that shows
    # the same frame twice when the machine is busy).
    change = np.max([np.abs(b - shots[0]).sum(-1) for b in shots[1:]], axis=0)
    assert change.mean() > 0.05, "frames do not change while speech plays"
    # The mouth region changes: project the inside-mouth Gaussians into the viewport.
    from recon.gaussians import MOUTH

    viewmat, K, w, h = session.view(int(session.max_res.value))
    mouth = studio.av.model.branch(MOUTH).means.detach()
    pc = mouth @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = (pc[:, :2] / pc[:, 2:] * K[[0, 1], [0, 1]] + K[[0, 1], [2, 2]]).median(0).values.numpy()
    x = int(uv[0] / w * VIEWPORT["width"]) - VIEW[1].start
    y = int(uv[1] / h * VIEWPORT["height"]) - VIEW[0].start
    r = 40
    assert r <= x <= VIEW[1].stop - VIEW[1].start - r and r <= y <= VIEW[0].stop - VIEW[0].start - r, (x, y)
    near = change[max(y - r, 0): y + r, max(x - r, 0): x + r].mean()
    still_change = np.abs(still[0].astype(int) - still[1].astype(int)).sum(-1)
    assert near > 1.0 and near > 10 * still_change[max(y - r, 0): y + r, max(x - r, 0): x + r].mean() + 0.2, near
    page.get_by_role("button", name="Pause").click()
    wait_for(lambda: not session.play.playing, what="pause")
    page.close()


def test_bad_upload_is_refused_and_the_server_keeps_serving(browser, studio):
    page, _ = open_tab(browser, studio)
    page.locator("input[type=file]").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not audio at all"}])
    page.get_by_text("Upload refused").wait_for(timeout=30_000)
    session = next(iter(studio.sessions.values()))
    session.dirty = True
    settle(session, 0.2)
    assert studio.running and session.stats["fps"] > 0
    page.close()


def test_uploads_snapshots_and_recordings(lively_avatar, speech_wav, tmp_path):
    """Server side of the GUI actions (no browser): validation, snapshot PNG, recording mp4."""
    import av
    import soundfile as sf

    from viewer.avatar_view import Recording, Studio, track_from_upload

    studio = Studio(lively_avatar, [], port=free_port(), verbose=False)
    try:
        with pytest.raises(AvatarError, match="is empty"):
            track_from_upload("empty.wav", b"", studio.av)
        with pytest.raises(AvatarError, match="notes.wav"):
            track_from_upload("notes.wav", b"RIFF....garbage", studio.av)
        buf = io.BytesIO()
        sf.write(buf, np.zeros(16000 * 2, np.float32), 16000, format="WAV")
        with pytest.raises(AvatarError, match="silent.wav"):
            track_from_upload("silent.wav", buf.getvalue(), studio.av)
        track = track_from_upload("speech.wav", speech_wav.read_bytes(), studio.av)
        assert abs(track.seconds - 2.3) < 0.05
        # Longer than the viewer plays: refused while decoding (half an hour of 8 kHz audio, 29 MB).
        long = io.BytesIO()
        sf.write(long, np.zeros(8000 * 1800, np.int16), 8000, format="WAV", subtype="PCM_16")
        t0 = time.perf_counter()
        with pytest.raises(AvatarError, match="half-hour.wav: is longer than 180 s"):
            track_from_upload("half-hour.wav", long.getvalue(), studio.av)
        assert time.perf_counter() - t0 < 20
        # Other audio under a name already taken is another track; caches follow the audio.
        assert studio.add_track(track) is track and track.name == "speech.wav"
        pcm, rate = sf.read(speech_wav)
        other = io.BytesIO()
        sf.write(other, np.concatenate([pcm, pcm]), rate, format="WAV")
        longer = studio.add_track(track_from_upload("speech.wav", other.getvalue(), studio.av))
        assert longer.name == "speech (2).wav" and set(studio.tracks) == {"speech.wav", "speech (2).wav"}
        assert studio.wav_b64(longer) != studio.wav_b64(track)
        assert len(studio.blinks(longer)) == len(longer.drive) > len(track.drive) + 50
        assert studio.add_track(track_from_upload("speech.wav", speech_wav.read_bytes(), studio.av)).name \
            == "speech.wav" and len(studio.tracks) == 2  # the same audio again: the same track

        class FakeClient:  # what a session needs from a browser tab, for the offline actions
            downloads, notes = [], []

            def send_file_download(self, name, content):
                self.downloads.append((name, len(content)))

            def add_notification(self, title, body, **kw):
                self.notes.append(title)
                return type("Note", (), {"remove": lambda self: None})()

        from viewer.avatar_view import ClientSession, ViewSettings

        session = ClientSession.__new__(ClientSession)
        session.studio, session.client, session.settings = studio, FakeClient(), ViewSettings()
        session.play = type("P", (), {"track": track})()
        viewmat = studio.renderer.rig.at(10, 0)
        K = studio.renderer.intrinsics(studio.fov_y, 64, 64)
        rec = Recording({k: (viewmat, K, 64, 64) for k in (0, 10, 30)})
        path = session.save_recording(rec)
        with av.open(str(path)) as c:
            kinds = {s.type: s.codec_context.name for s in c.streams}
            n = sum(1 for _ in c.decode(video=0))
        assert kinds == {"video": "h264", "audio": "aac"} and n == 31
        assert path.parent == lively_avatar / "recordings" and session.client.downloads[-1][0] == path.name
        for mode in ("RGB", "depth", "alpha", "face branch", "mouth branch", "centres"):
            rgb, t = studio.renderer.render(viewmat, K, 64, 48, track.drive.codes(5), ViewSettings(mode=mode))
            assert rgb.shape == (48, 64, 3) and rgb.max() > 0 and t["rasterize"] > 0
    finally:
        studio.stop()
