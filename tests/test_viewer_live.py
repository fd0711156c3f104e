"""The studio's microphone (viewer/microphone.py, recon/live.py): headless Chromium with a
fake microphone playing speech, then silence, drives the avatar live; the mouth moves
while the microphone speaks and stops when it is silent, the readout gives the latency
by stage, and nothing is written to disk unless the user records (then an mp4 of the
take with what the microphone heard)."""


import numpy as np
import pytest
import soundfile as sf

from test_viewer_avatar import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, lively_avatar, wait_for  # noqa: F401 (fixtures)
from test_viewer_dataset import free_port

pytestmark = pytest.mark.slow

SPEECH_S, SILENCE_S = 2.5, 3.0


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory):
    from scenes.speech import synthesize

    path = tmp_path_factory.mktemp("mic") / "microphone.wav"
    speech = synthesize(SPEECH_S, seed=4).pcm
    sf.write(path, np.concatenate([speech, np.zeros(int(SILENCE_S * 16000), np.float32)]), 16000)
    return path


@pytest.fixture(scope="module")
def mic_browser(microphone_wav):
    from pathlib import Path

    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    playwright = pytest.importorskip("playwright.sync_api")
    fake = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone_wav}%noloop"]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + fake)
        yield b
        b.close()


def test_the_microphone_drives_the_mouth_live(mic_browser, lively_avatar):
    from viewer.avatar_view import Studio

    before = sorted(p.relative_to(lively_avatar) for p in lively_avatar.rglob("*"))
    studio = Studio(lively_avatar, [], port=free_port(), resolution=128, verbose=False)
    try:
        page = mic_browser.new_page(viewport=VIEWPORT)
        page.goto(studio.url)
        page.get_by_text("Connected").wait_for(timeout=30_000)
        wait_for(lambda: any(s.stats["fps"] > 0 for s in studio.sessions.values()), what="a first frame")
        session = next(iter(studio.sessions.values()))
        session.auto_blink.value = False  # blinks would move the frame in the silence too
        shown = []  # (stream seconds of the live frame sent, the frame)
        send = session.client.scene.set_background_image

        def spy(rgb, **kw):
            live = session.live_frame
            if session.live is not None and live is not None:
                shown.append((live[0].index / studio.av.fps, rgb.astype(np.int16)))
            return send(rgb, **kw)

        session.client.scene.set_background_image = spy
        mic = page.frame_locator("iframe[title=microphone]").locator("#mic")
        mic.click()
        wait_for(lambda: session.live is not None, what="the microphone stream")
        wait_for(lambda: shown and shown[-1][0] > SPEECH_S + SILENCE_S - 0.6, timeout=60, what="the silence")
        assert "Stop microphone" in mic.inner_text()
        readout = session.stats_md.content  # while the microphone is on
        assert all(k in readout for k in ("live: sound to frame", "transit", "motion: the live motion net")), readout
        mic.click()
        wait_for(lambda: session.live is None, what="the stream to close")

        def change(lo, hi):  # mean change between consecutive frames sent from stream time lo to hi
            frames = [f for t, f in shown if lo <= t < hi]
            assert len(frames) >= 5, (lo, hi, len(frames))
            return float(np.mean([np.abs(b - a).mean() for a, b in zip(frames, frames[1:])
                                  if a.shape == b.shape]))  # (a still frame is sharper: twice the size)

        speaking, silent = change(0.3, SPEECH_S - 0.2), change(SPEECH_S + 0.8, SPEECH_S + SILENCE_S)
        assert speaking > 0.2 and silent < 0.2 * speaking, (speaking, silent)
        lat = session.latency
        assert len(lat) > 20 and set(lat[0]) >= {"total", "buffering", "transit", "queue", "features", "motion",
                                                  "deform", "rasterize", "encode"}
        assert np.median([r["buffering"] for r in lat]) >= 80 - 25  # a frame waits for its look-ahead (clock jitter)
        transit = np.median([r["transit"] for r in lat])  # the page -> the server, on the browser's clock tied to ours
        assert 0 <= transit < 200, transit  # 0 where a capture stamp after its arrival is clamped to it (by design)
        assert sorted(p.relative_to(lively_avatar) for p in lively_avatar.rglob("*")) == before  # nothing written

        # Recorded on purpose: Record while the microphone is on; closing the stream ends the take.
        mic.click()
        wait_for(lambda: session.live is not None and session.live_frame is not None, what="the stream again")
        session._toggle_record()  # what the Record button does
        wait_for(lambda: session.live_frame[0].index / studio.av.fps > 1.5, what="a second and a half heard")
        mic.click()
        takes = lambda: list((lively_avatar / "recordings").glob("recording_*.mp4"))  # noqa: E731 (not the temp file)
        wait_for(takes, timeout=120, what="the recording")
        video = takes()[0]
        from avatar.media import open_media

        with open_media(video, "video", "") as c:
            kinds = {st.type for st in c.streams}
            frames = sum(1 for _ in c.decode(video=0))
        assert kinds == {"video", "audio"} and frames >= 0.8 * 25
    finally:
        studio.stop()


def test_the_browser_clock_is_tied_by_the_round_trip_with_the_least_delay():
    import time

    from viewer.microphone import BrowserClock

    clock = BrowserClock()
    assert clock.perf(1000.0) is None  # no round trip yet
    clock.sample(ping=1000.0, server=6010.0, back=1040.0)  # 40 ms round trip: offset 4990 +- 20
    clock.sample(ping=2000.0, server=7003.0, back=2006.0)  # 6 ms: offset 5000 +- 3, kept
    clock.sample(ping=3000.0, server=9000.0, back=3100.0)  # slower: ignored
    clock.sample(ping=3000.0, server=float("nan"), back=3001.0)  # damaged: ignored
    assert clock.offset_ms == 5000.0 and clock.rtt_ms == 6.0
    assert clock.perf(time.perf_counter() * 1000 - 5000.0) == pytest.approx(time.perf_counter(), abs=0.01)
