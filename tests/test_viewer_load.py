"""The studio under load and misuse: eight browser tabs for a minute on loopback, tabs
closed mid-render and reopened, bad uploads of every kind. The server stays up, every tab
keeps its own camera and speech track, every bad upload gets a message in its page."""

import random
import time

import numpy as np
import pytest
import soundfile as sf

from test_viewer_avatar import VIEWPORT, browser, lively_avatar, move_camera, wait_for  # noqa: F401 (fixtures)
from test_viewer_dataset import free_port

pytestmark = pytest.mark.slow

TABS = 8
SECONDS = 60.0


@pytest.fixture(scope="module")
def minute_speech(tmp_path_factory):
    """Speech that plays through the whole minute."""
    from scenes.speech import synthesize

    path = tmp_path_factory.mktemp("minute") / "minute_speech.wav"
    sf.write(path, synthesize(SECONDS + 10, seed=11).pcm, 16000)
    return path


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bad_uploads(folder) -> list[tuple[object, str]]:
    """(file to upload, what its page must say)."""
    from avatar.media import write_mp4

    (folder / "empty.wav").write_bytes(b"")
    (folder / "noise.mp3").write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    write_mp4(folder / "clip.mp4", (np.full((64, 64, 3), 90, np.uint8) for _ in range(25)), 25.0)
    sf.write(folder / "two_hours.wav", np.zeros(8000 * 7200, np.float32), 8000, subtype="PCM_U8")  # 55 MB
    # The largest first: its upload takes the page about 20 s.
    return [(folder / "two_hours.wav", "uploads are limited to 50 MB"), (folder / "empty.wav", "is empty"),
            (folder / "noise.mp3", "noise.mp3: "), (folder / "clip.mp4", "has no audio stream")]


WATCH_TEXT = """message => {
    // Remember that `message` appeared in the page: a notification closes after seconds.
    const seen = (window.seenTexts = window.seenTexts || new Set());
    const observer = new MutationObserver(() => check());
    const check = () => {
        if (document.body.innerText.includes(message)) { seen.add(message); observer.disconnect(); }
    };
    observer.observe(document.body, {subtree: true, childList: true, characterData: true});
    check();
}"""


def test_eight_tabs_for_a_minute(browser, lively_avatar, minute_speech, speech_wav, tmp_path, capsys):  # noqa: F811
    from viewer.avatar_view import Studio

    studio = Studio(lively_avatar, [minute_speech], port=free_port(), resolution=128, verbose=False)
    rss_before = rss_mib()
    rng = random.Random(0)
    pages, expected = {}, {}  # tab number -> page; client id -> (camera position, track name)

    def open_tab(k: int, play: bool = True):
        known = set(studio.sessions)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(studio.url)
        page.get_by_text("Connected").wait_for(timeout=60_000)
        wait_for(lambda: set(studio.sessions) - known, what="the new tab's session")
        (cid,) = set(studio.sessions) - known
        session = studio.sessions[cid]
        # Its first frame, and the camera the studio placed on the face as the browser
        # reports it back (a loading page may first report its own default).
        wait_for(lambda: session.frames_sent > 0 and session.camera_placed, what="its first frame and its camera")
        # Its own camera, a little to one side (as the browser reports it back), and the speech playing.
        target = np.asarray(session.client.camera.position) + np.array([0.01 * (k - TABS / 2), 0.005 * k, 0.0])
        move_camera(session, target)
        if play:  # the first tabs wait for the minute to start: their renders would slow the others' loading
            session.start()
        expected[cid] = (target, session.play.track.name)
        pages[k] = (page, cid)

    try:
        for k in range(TABS):
            open_tab(k, play=False)
        # One tab plays another track, uploaded by it.
        page0, cid0 = pages[0]
        page0.locator("input[type=file]").set_input_files(
            files=[{"name": "mine.wav", "mimeType": "audio/wav", "buffer": speech_wav.read_bytes()}])
        wait_for(lambda: studio.sessions[cid0].play.track.name == "mine.wav", what="the uploaded track")
        studio.sessions[cid0].start()
        expected[cid0] = (expected[cid0][0], "mine.wav")
        for _, cid in pages.values():  # the minute starts: every tab plays from the top
            studio.sessions[cid].play.seek(0.0)
            studio.sessions[cid].start()
        frames0 = {cid: studio.sessions[cid].frames_sent for _, cid in pages.values()}
        uploads = bad_uploads(tmp_path)
        t_start = time.time()
        next_churn, churned, refused = t_start + 8, 0, 0
        pending: dict[int, str] = {}  # tab -> the message its upload awaits (that tab is not closed meanwhile)
        uploaded: set[int] = set()  # each upload goes to a tab of its own: no earlier refusal shows there
        while time.time() - t_start < SECONDS:
            if uploads and time.time() - t_start > 5 + 12 * (4 - len(uploads)):
                path, message = uploads.pop(0)
                k = rng.choice([k for k in range(1, TABS) if k not in uploaded])
                uploaded.add(k)
                pages[k][0].evaluate(WATCH_TEXT, message)
                pages[k][0].locator("input[type=file]").set_input_files(path)
                pending[k] = message
            for k, message in list(pending.items()):
                if pages[k][0].evaluate("m => (window.seenTexts || new Set()).has(m)", message):
                    refused += 1
                    del pending[k]
            if time.time() > next_churn and time.time() - t_start < SECONDS - 8:  # close a tab while it
                # renders, open another (which takes a few seconds: none starts in the minute's last 8 s)
                k = rng.choice([k for k in range(1, TABS) if k not in pending])
                page, cid = pages.pop(k)
                page.close()
                expected.pop(cid)
                open_tab(k)
                churned += 1
                next_churn = time.time() + 4
            time.sleep(0.2)
        elapsed = time.time() - t_start
        frames_sent = {cid: studio.sessions[cid].frames_sent for _, cid in pages.values()}
        assert not uploads, f"uploads not started within the minute: {uploads}"
        for k, message in pending.items():  # an upload still under way when the minute ended
            pages[k][0].wait_for_function("m => (window.seenTexts || new Set()).has(m)", arg=message, timeout=60_000)
            refused += 1
        assert studio.running and refused == 4 and churned >= 3
        assert set(studio.sessions) == {cid for _, cid in pages.values()}  # closed tabs left, nothing leaked
        fps = {}
        for k, (page, cid) in sorted(pages.items()):
            session = studio.sessions[cid]
            position, track = expected[cid]
            assert np.allclose(np.asarray(session.client.camera.position), position, atol=1e-5), f"tab {k} camera"
            assert session.play.track.name == track, f"tab {k} track"
            fps[k] = (frames_sent[cid] - frames0.get(cid, 0)) / elapsed if cid in frames0 else None
            assert session.frames_sent > 0
        survivors = [v for v in fps.values() if v is not None]
        assert survivors and min(survivors) > 0  # every tab that lived through the minute kept getting frames
        rss_after = rss_mib()
        with capsys.disabled():
            print(f"\n{TABS} tabs, {elapsed:.0f} s, {churned} closed and reopened, {refused} bad uploads refused; "
                  f"frames/s per surviving tab: {', '.join(f'{v:.1f}' for v in survivors)}; "
                  f"server RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
        assert rss_after - rss_before < 1024
    finally:
        for page, _ in pages.values():
            page.close()
        studio.stop()
