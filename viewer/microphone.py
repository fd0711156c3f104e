"""The studio's microphone: a browser tab streams what its microphone hears to the server,
which drives the avatar with it live (recon/live.py).

viser's HTML panels do not run scripts, so the microphone's page is an iframe in the
Speech panel, served by a small websocket server on a port of its own beside viser's,
on the same host (loopback by default). Its toggle starts the microphone (the browser
asks the user first); an AudioWorklet cuts the sound into 20 ms chunks of 16 kHz mono,
sent over a websocket to /stream/<token>, one token per tab, each as the moment the page
got it from the worklet (float64 milliseconds of the browser's clock, little-endian) and
16-bit PCM. The server hands each chunk to the tab (`on_audio`) with that moment on the
server's clock, and says when a tab's stream opens and closes (`on_state`). The two
clocks are tied as NTP does (BrowserClock): the page pings every 2 s, and the round trip
with the least delay gives the offset (kept for the stream: clocks drift by parts per
million). Audio stays in memory: nothing here writes it to
disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus

import numpy as np

from avatar.errors import AvatarError

CHUNK_SAMPLES = 320  # 20 ms at 16 kHz

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><style>
body { margin: 0; font: 13px system-ui, sans-serif; color: #444; background: transparent; }
button { font: inherit; padding: 4px 10px; border-radius: 6px; border: 1px solid #bbb; background: #fff; cursor: pointer; }
button.live { background: #d33; color: #fff; border-color: #d33; }
</style></head><body>
<button id="mic">Start microphone</button> <span id="state"></span>
<script>
const CHUNK = __CHUNK__;
const worklet = `class Chunker extends AudioWorkletProcessor {
  constructor() { super(); this.buf = new Float32Array(${CHUNK}); this.n = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) for (let i = 0; i < ch.length; i++) {
      this.buf[this.n++] = ch[i];
      if (this.n === ${CHUNK}) { this.port.postMessage(this.buf.slice(0)); this.n = 0; }
    }
    return true;
  }
}
registerProcessor("chunker", Chunker);`;
const btn = document.getElementById("mic"), state = document.getElementById("state");
const now = () => performance.timeOrigin + performance.now();  // ms, the browser's clock
let live = null;
async function start() {
  live = {};  // filled as each part is made: stop() frees what a failed start made
  const stream = live.stream = await navigator.mediaDevices.getUserMedia(
    {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
  const ctx = live.ctx = new AudioContext({sampleRate: 16000});
  await ctx.audioWorklet.addModule(URL.createObjectURL(new Blob([worklet], {type: "application/javascript"})));
  const ws = live.ws = new WebSocket(`ws://${location.host}/stream/__TOKEN__`);
  ws.binaryType = "arraybuffer";
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error("the studio did not answer")); });
  ws.onmessage = (e) => {  // the clock: {pong, server} answered with when it came back
    const m = JSON.parse(e.data);
    if ("pong" in m) ws.send(JSON.stringify({ping: m.pong, server: m.server, back: now()}));
  };
  const ping = () => { if (ws.readyState === 1) ws.send(JSON.stringify({ping: now()})); };
  ping();
  live.clock = setInterval(ping, 2000);
  const node = new AudioWorkletNode(ctx, "chunker");
  node.port.onmessage = (e) => {
    if (ws.readyState !== 1) return;
    const f = e.data, buf = new ArrayBuffer(8 + 2 * f.length);
    new DataView(buf).setFloat64(0, now(), true);
    const pcm = new Int16Array(buf, 8);
    for (let i = 0; i < f.length; i++) pcm[i] = Math.max(-1, Math.min(1, f[i])) * 32767;
    ws.send(buf);
  };
  const mute = ctx.createGain();
  mute.gain.value = 0;  // the graph must reach the output to run; silently, so nothing echoes
  ctx.createMediaStreamSource(stream).connect(node);
  node.connect(mute).connect(ctx.destination);
  ws.onclose = () => stop("the studio closed the stream");
  btn.textContent = "Stop microphone"; btn.className = "live"; state.textContent = "the avatar speaks what it hears";
}
function stop(why) {
  if (live) {
    if (live.stream) live.stream.getTracks().forEach((t) => t.stop());
    if (live.ctx) live.ctx.close();
    if (live.clock) clearInterval(live.clock);
    if (live.ws && live.ws.readyState <= 1) live.ws.close();
    live = null;
  }
  btn.textContent = "Start microphone"; btn.className = ""; state.textContent = why || "";
}
btn.onclick = () => live ? stop() : start().catch((e) => stop("microphone unavailable: " + e.message));
</script></body></html>
"""


class BrowserClock:
    """A page's clock against the server's, from ping round trips (module docstring): the
    trip with the least delay bounds the offset best (NTP's rule)."""

    def __init__(self):
        self.offset_ms: float | None = None  # the server's time.perf_counter() minus the browser's clock
        self.rtt_ms = math.inf

    def sample(self, ping: float, server: float, back: float) -> None:
        """One round trip: sent at `ping` and back at `back` (browser ms), answered at
        `server` (the server's time.perf_counter(), ms)."""
        rtt = back - ping
        if all(map(math.isfinite, (ping, server, back))) and 0 <= rtt < self.rtt_ms:
            self.offset_ms, self.rtt_ms = server - (ping + back) / 2, rtt

    def perf(self, browser_ms: float) -> float | None:
        """A moment of the browser's clock on the server's time.perf_counter(), or None
        before the first round trip."""
        if self.offset_ms is None or not math.isfinite(browser_ms):
            return None
        return (browser_ms + self.offset_ms) / 1000


class MicServer:
    """The microphone pages and their audio streams (module docstring), on `host` at a free
    port, in a thread of its own. on_audio(tab, pcm [n] float32 in [-1, 1], captured: when
    the page got the chunk, on time.perf_counter(), or None before its clock is known) and
    on_state(tab, streaming) are called from that thread."""

    def __init__(self, host: str, on_audio: Callable[[int, np.ndarray, float | None], None],
                 on_state: Callable[[int, bool], None]):
        self.host, self.on_audio, self.on_state = host, on_audio, on_state
        self.tokens: dict[str, int] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._failed: Exception | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="viewer-microphone", daemon=True)
        self._thread.start()
        started.wait(30)
        if not self.port:
            raise AvatarError(None, f"the studio's microphone server could not start on {host} "
                              f"({self._failed or 'no answer in 30 s'})", "check --host, or free a port")

    def page_url(self, tab: int) -> str:
        """The microphone page of browser tab `tab` (a token of its own)."""
        token = secrets.token_urlsafe(16)
        self.tokens[token] = tab
        return f"http://{self.host}:{self.port}/mic/{token}"

    def forget(self, tab: int) -> None:
        """Refuse the tab's streams from now on (it closed)."""
        for token in [t for t, owner in self.tokens.items() if owner == tab]:
            del self.tokens[token]

    def stop(self) -> None:
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(5)

    def _run(self, started: threading.Event) -> None:
        from websockets.asyncio.server import serve

        async def main() -> None:
            self._stopped = asyncio.Event()
            async with serve(self._stream, self.host, 0, process_request=self._page, max_size=2**16) as server:
                self.port = server.sockets[0].getsockname()[1]
                started.set()
                await self._stopped.wait()

        try:
            self._loop.run_until_complete(main())
        except OSError as exc:  # the address cannot be bound
            self._failed = exc
        finally:
            started.set()

    def _page(self, connection, request):
        """The microphone page for GET /mic/<token>; /stream/<token> goes on to the websocket."""
        kind, _, token = request.path.strip("/").partition("/")
        if token not in self.tokens:
            return connection.respond(HTTPStatus.NOT_FOUND, "no such microphone page\n")
        if kind == "stream":
            return None
        if kind != "mic":
            return connection.respond(HTTPStatus.NOT_FOUND, "no such microphone page\n")
        response = connection.respond(HTTPStatus.OK, PAGE.replace("__CHUNK__", str(CHUNK_SAMPLES))
                                      .replace("__TOKEN__", token))
        del response.headers["Content-Type"]  # respond() gives text/plain
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        return response

    async def _stream(self, ws) -> None:
        tab = self.tokens.get(ws.request.path.strip("/").partition("/")[2])
        if tab is None:
            return
        self.on_state(tab, True)
        clock = BrowserClock()
        try:
            async for message in ws:
                if isinstance(message, bytes) and len(message) >= 10:
                    captured = struct.unpack_from("<d", message)[0]
                    pcm = np.frombuffer(message[8: 8 + (len(message) - 8) // 2 * 2], np.int16).astype(np.float32)
                    self.on_audio(tab, pcm / 32768.0, clock.perf(captured))
                elif isinstance(message, str):
                    await self._clock(ws, clock, message)
        finally:
            self.on_state(tab, False)

    @staticmethod
    async def _clock(ws, clock: BrowserClock, message: str) -> None:
        """A ping is answered with the server's time; its echo is a round trip."""
        try:
            m = json.loads(message)
            if "back" in m:
                clock.sample(float(m["ping"]), float(m["server"]), float(m["back"]))
            elif "ping" in m:
                await ws.send(json.dumps({"pong": float(m["ping"]), "server": time.perf_counter() * 1000}))
        except (ValueError, TypeError, KeyError):  # not the page's: ignored
            return
