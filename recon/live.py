"""Live speech: the avatar speaks what a microphone hears, a frame at a time, with low
latency (`avatar speak AVATAR --audio SPEECH --realtime` simulates the stream from a file).

The path of a frame: 16 kHz mono chunks -> capture's SpeechStream (a frame's features as
soon as the audio 80 ms past it has arrived, or the whole look-ahead if shorter) ->
RunningCMVN (the speaker's normalisation, learnt as they talk) -> the avatar's
`speech_motion` over the frame's past `speech_reach` frames and as many future ones: those
the rest of the look-ahead completes, then those whose own moment has been heard (their
windows cut short where the audio ends), then the last of them held -> deform ->
rasterize -> encode (JPEG, what a browser shows). Nothing beyond the look-ahead (default
80 ms) is ever read, so a frame's earliest moment is its sound plus the look-ahead.

The look-ahead trades latency for articulation: MotionNet's codes depend on speech up to
`speech_reach` frames ahead (lips move before the sound they make). Measured on a 13 s
and a 40 s voice through an HDTF avatar, the correlation of the streamed lip gap with the
offline one on the whole file: 0.57 and 0.65 at 80 ms, 0.83 and 0.84 at 160 ms, 0.91 and
0.92 at 240 ms (the rest: the running normalisation and the streaming visemes). Held-out
face PSNR driven by the clip's own speech streamed (eval's `live_speech`) falls by 0.99 and
0.62 dB at 80 ms (HDTF, the 20 s clip), 0.23 and 0.25 dB at 160 ms, 0.08 and 0.22 dB at
240 ms. A MotionNet trained on a frame's own and earlier speech only (its convolutions cut
at the present) did no better at 80 ms (0.80 dB, and its lip gap uncorrelated with the
offline net's on other voices).

So training ends with a live motion net for its look-ahead (`live_lookahead_ms`, 80 ms;
distill_live_motion): the offline net fine-tuned to give, from the windows a stream has
heard, the codes it gives offline, on reordered and sped-up copies of the training speech.
Blended with the offline net (LIVE_NET_WEIGHT), it brings the 80 ms cost to 0.31 and
0.35 dB, and the lip gap on three other voices follows the offline one about as well or better
(correlation 0.68, 0.59, 0.61 against 0.65, 0.57, 0.62 through the HDTF avatar; 0.73,
0.73, 0.73 against 0.69, 0.69, 0.68 through the 20 s clip's), opening to 0.73-0.95 of the
offline range (the offline net streamed: 0.98-1.34). Other look-aheads drive the offline net.

Latency is measured per frame from the moment its sound reached the microphone (the
stream's clock: frame k's sound is at k / fps) to its JPEG, split into
  buffering   until the chunk that completes the look-ahead has arrived,
  queue       that chunk waiting while an earlier frame rendered,
  features, motion, deform, rasterize, encode.
When frames become ready faster than they render, only the newest is rendered (a live
view skips, it does not fall behind); the sustained frame rate counts those rendered.
"""

from __future__ import annotations

import copy
import queue
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avatar.dataset_format import SAMPLE_RATE
from avatar.errors import AvatarError
from avatar.media import write_mp4

from .avatar_dir import load_avatar
from .checkpoint import load_checkpoint, save_checkpoint, tensors_digest
from .dataset import Dataset
from .conditioning import RunningCMVN, blink_schedule, load_speech, mel_input, normalize_mel, viseme_features
from .method import TrainedAvatar
from .motion import MotionNet
from .render import CameraRig, behind, open_dataset, scaled

STAGES = ("buffering", "queue", "features", "motion", "deform", "rasterize", "encode")


@dataclass
class LiveFrame:
    """One video frame of live speech, ready to render."""

    index: int
    codes: Tensor  # [C] motion codes
    eye: float  # eye openness
    heard_s: float  # audio received (stream seconds) when it became ready
    ms: dict = field(default_factory=dict)  # features and motion cost (milliseconds)


class LiveSpeech:
    """A live speech stream -> motion codes of each video frame, causally (module docstring).

    av: the trained avatar (speech_motion, speech_reach, fps); lookahead_s: how far past a
    frame its features may look; prior_mel: [N, 16, 80] log-mel windows of the subject's
    clip (the normalisation's prior), or None; seed: of the natural blinks; motion: "auto"
    (the avatar's live motion net where one was distilled for this look-ahead, else its
    offline net; `motion_note` says which and why) or "offline".
    """

    FEATURE_LOOKAHEAD_S = 0.08
    """How far past a frame its own features reach (the log-mel window's later half)."""

    def __init__(self, av: TrainedAvatar, lookahead_s: float = 0.08, prior_mel: np.ndarray | None = None,
                 seed: int = 0, motion: str = "auto"):
        from capture import SpeechStream

        av.check_speech()
        if motion not in ("auto", "offline"):
            raise ValueError(f"motion must be 'auto' or 'offline', got {motion!r}")
        self.av = av
        self.net, self.motion_note = (live_motion_net(av, lookahead_s) if motion == "auto"
                                      else (None, "the offline net, as asked"))
        self.stream = SpeechStream(av.fps, min(lookahead_s, self.FEATURE_LOOKAHEAD_S))
        self.cmvn = RunningCMVN(prior_mel)
        # Future frames the rest of the look-ahead lets the motion see (no more than it reaches).
        self.ahead = min(int((max(lookahead_s - self.FEATURE_LOOKAHEAD_S, 0.0) + 1e-9) * av.fps), av.speech_reach)
        self.heard: deque[dict] = deque(maxlen=av.speech_reach + 1 + self.ahead)  # frames with features
        self.next = 0  # the next frame to give codes to
        self.blinks = blink_schedule(int(600 * av.fps), av.fps, seed)  # ten minutes, then again

    def push(self, pcm: np.ndarray) -> list[LiveFrame]:
        """Frames made ready by a chunk of pcm [n] (float, 16 kHz mono), in order."""
        t = time.perf_counter()
        ready = self.stream.push(pcm)
        return self._motion(ready, (time.perf_counter() - t) * 1000, end=False)

    def stream_all(self, pcm: np.ndarray, chunk_ms: float = 20.0) -> list[LiveFrame]:
        """Every frame of pcm [n] (16 kHz mono) pushed in `chunk_ms` chunks, as a microphone
        delivers it, then flushed."""
        chunk = max(1, int(round(chunk_ms / 1000 * SAMPLE_RATE)))
        return [f for start in range(0, len(pcm), chunk) for f in self.push(pcm[start: start + chunk])] + self.flush()

    def flush(self) -> list[LiveFrame]:
        """The frames left once the stream has ended."""
        t = time.perf_counter()
        ready = self.stream.flush()
        return self._motion(ready, (time.perf_counter() - t) * 1000, end=True)

    def _motion(self, ready: list[dict], features_ms: float, end: bool) -> list[LiveFrame]:
        """Codes of the frames the newly `ready` ones complete: each heard in turn (the
        window keeps just what the next frame needs), then at the end the rest."""
        out = []
        for f in ready:
            t = time.perf_counter()
            f["mel_norm"] = self.cmvn(f["mel"])
            self.heard.append(f)
            out += self._drain(False, features_ms / len(ready) + (time.perf_counter() - t) * 1000)
        return out + (self._drain(True, 0.0) if end else [])

    def _drain(self, end: bool, features_ms: float) -> list[LiveFrame]:
        """Codes of every frame whose future (`ahead` frames, or at the end what there is)
        has been heard."""
        out = []
        newest = self.heard[-1]["index"] if self.heard else -1
        while self.heard and (self.next + self.ahead <= newest or (end and self.next <= newest)):
            t = time.perf_counter()
            window = [f for f in self.heard if f["index"] >= self.next - self.av.speech_reach]
            at = self.next - window[0]["index"]
            window += self._heard_ahead(at + self.av.speech_reach + 1 - len(window), end)
            codes = self._codes(window, at)
            out.append(LiveFrame(self.next, codes, float(self.blinks[self.next % len(self.blinks)]),
                                 self.heard[-1]["heard_s"], {"features": features_ms,
                                                             "motion": (time.perf_counter() - t) * 1000}))
            self.next += 1
        return out

    def _codes(self, window: list[dict], at: int) -> Tensor:
        """[C] the codes of frame `at` of `window` (frames with features, past to future)."""
        feats = {"mel": np.stack([w["mel"] for w in window]),
                 "mel_norm": torch.stack([w["mel_norm"] for w in window]),
                 "visemes": np.stack([w["visemes"] for w in window]),
                 "energy": np.array([w["energy"] for w in window], np.float32)}
        with torch.no_grad():
            if self.net is None:
                return self.av.speech_motion(feats)[at]
            on = self.net.centre.device
            mel, vis = mel_input(feats).to(on), viseme_features(feats).to(on)
            raw = ((1 - LIVE_NET_WEIGHT) * self.av.motion_net.eval().raw(mel, vis)
                   + LIVE_NET_WEIGHT * self.net.raw(mel, vis))
            return self.net.calibrated(raw, vis)[at]  # one closure per bilabial, on the blend

    def _heard_ahead(self, count: int, end: bool) -> list[dict]:
        """`count` frames past the newest whose look-ahead is in: those whose own moment
        has been heard, from what has (SpeechStream.peek), then the last of them held."""
        out, last = [], self.heard[-1]
        k = last["index"] + 1
        while len(out) < count and not end and k / self.av.fps * SAMPLE_RATE <= self.stream.received:
            f = self.stream.peek(k)
            out.append({**f, "mel_norm": self.cmvn.normalize(f["mel"])})
            k += 1
        return out + [out[-1] if out else last] * (count - len(out))


def stream_codes(av: TrainedAvatar, pcm: np.ndarray, lookahead_s: float = 0.08, prior_mel: np.ndarray | None = None,
                 chunk_ms: float = 20.0, motion: str = "auto") -> tuple[Tensor, str]:
    """([N, C] the motion codes a live stream gives every frame of `pcm` (16 kHz mono),
    delivered in `chunk_ms` chunks: as `speak` and the studio's microphone drive the
    avatar, for scoring against the offline codes; which net gave them: LiveSpeech's
    `motion_note`)."""
    live = LiveSpeech(av, lookahead_s, prior_mel, motion=motion)
    return torch.stack([f.codes for f in live.stream_all(pcm, chunk_ms)]), live.motion_note


LIVE_MOTION = "live_motion.safetensors"
"""The live motion net in an avatar folder: a MotionNet's state (`net.*`) and metadata
{"kind": "live-motion", "lookahead_ms", "teacher" (the SHA-1 of the offline net it was
distilled from), the distillation's figures}, as a checkpoint (recon/checkpoint.py)."""
LIVE_NET_WEIGHT = 0.7
"""Live codes are this much the live net's and the rest the offline net's (their raw codes,
both fed the same window, then calibrated and the lips closed once). Alone, the live net's
lip gap followed the offline one less than the offline net's own did on other voices
(correlation 0.59 against 0.65 and 0.51 against 0.57 through an HDTF avatar); the two
together followed it better than either (0.68, 0.59), and kept most of the gain on the
subject's own voice (the module docstring)."""
LIVE_AUDIO_S = 240.0
"""Audio the distillation learns from, at most (a long clip's copies are excerpts of it)."""
SHIFTS_MS, SPEEDS = (0, 20, 10, 30), (1.0, 0.9, 1.1)


def live_motion_net(av: TrainedAvatar, lookahead_s: float) -> tuple[MotionNet | None, str]:
    """(the avatar's live motion net distilled for `lookahead_s`, on its device, or None;
    what drives the motion, and why): None where the avatar has none, where it was
    distilled for another look-ahead or from another state of the offline net (a stale
    file), or where the file is damaged; `avatar train ... --resume` fits it again."""
    path = av.root / LIVE_MOTION
    offline, refit = "the offline net", "`avatar train DATASET --out AVATAR --resume` fits it again"
    if av.motion_net is None or not path.is_file():
        return None, f"{offline}: the avatar has no live motion net ({refit})"
    try:
        tensors, meta = load_checkpoint(path)
    except AvatarError as exc:
        return None, f"{offline}: {LIVE_MOTION} is damaged ({exc.problem}; {refit})"
    if meta.get("kind") != "live-motion":
        return None, f"{offline}: {LIVE_MOTION} is not a live motion net ({refit})"
    if meta.get("teacher") != tensors_digest(av.motion_net.state_dict()):
        return None, f"{offline}: the live motion net was distilled from an earlier state of the avatar ({refit})"
    if abs(float(meta.get("lookahead_ms", -1)) - lookahead_s * 1000) > 0.5:
        return None, f"{offline}: the live motion net was distilled for a {meta.get('lookahead_ms')} ms look-ahead"
    net = copy.deepcopy(av.motion_net)
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    except RuntimeError:
        return None, f"{offline}: {LIVE_MOTION} does not fit the avatar's motion net ({refit})"
    return net.eval(), (f"the live motion net (distilled for {meta['lookahead_ms']:g} ms), "
                        f"{LIVE_NET_WEIGHT:g} of it with the offline net")


class _Windows(LiveSpeech):
    """A live stream that keeps, instead of computing codes, each frame's window: indices
    into `bank`, the distinct frames (with features) it has held, and the frame's place
    in it. The distillation's inputs are thus exactly what the live path feeds the net."""

    def __init__(self, av: TrainedAvatar, lookahead_s: float, prior_mel: np.ndarray | None):
        super().__init__(av, lookahead_s, prior_mel, motion="offline")
        self.bank: list[dict] = []  # held, so that id() stays unique
        self.where: dict[int, int] = {}
        self.windows: list[tuple[list[int], int]] = []
        self.codes = av.motion_net.centre.new_zeros(av.motion_net.centre.shape)

    def _codes(self, window: list[dict], at: int) -> Tensor:
        for w in window:
            if id(w) not in self.where:
                self.where[id(w)] = len(self.bank)
                self.bank.append(w)
        self.windows.append(([self.where[id(w)] for w in window], at))
        return self.codes


def speech_copies(pcm: np.ndarray, copies: int, seed: int = 0) -> list[tuple[int, float, np.ndarray]]:
    """Up to `copies` (at most 12) versions of pcm [n] (16 kHz): (shift ms, speed,
    samples), the clip as it is first, then started 0-30 ms later, its pieces reordered
    (shuffled_segments) and played 0.9-1.1x as fast (Kaldi's speed perturbation, by linear
    resampling). Each lasts at most LIVE_AUDIO_S / copies: a longer clip gives each copy
    an excerpt of its own (the first from the start)."""
    rng = np.random.default_rng(seed)
    plan = [(shift, speed) for speed in SPEEDS for shift in SHIFTS_MS]
    plan.sort(key=lambda p: (SHIFTS_MS.index(p[0]) + SPEEDS.index(p[1])) % len(SHIFTS_MS))  # mixed early
    plan = plan[:copies]
    out = []
    for k, (shift, speed) in enumerate(plan):
        x = pcm[int(shift * SAMPLE_RATE / 1000):]
        longest = int(LIVE_AUDIO_S / len(plan) * speed * SAMPLE_RATE)  # of the source, before the speed change
        if len(x) > longest:
            start = 0 if k == 0 else int(rng.integers(0, len(x) - longest + 1))
            x = x[start: start + longest]
        if k:
            x = shuffled_segments(x, rng)
        if speed != 1.0:
            x = np.interp(np.arange(0, len(x) - 1, speed), np.arange(len(x)), x).astype(np.float32)
        out.append((shift, speed, x))
    return out


def shuffled_segments(x: np.ndarray, rng: np.random.Generator, shortest_s: float = 0.3, longest_s: float = 1.2,
                      fade_s: float = 0.01) -> np.ndarray:
    """x [n] cut into pieces of `shortest_s`-`longest_s`, in a random order, joined with a
    `fade_s` crossfade: speech the net has not heard in that order."""
    cuts, at = [0], 0
    while at < len(x):
        at += int(rng.uniform(shortest_s, longest_s) * SAMPLE_RATE)
        cuts.append(min(at, len(x)))
    pieces = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    fade = int(fade_s * SAMPLE_RATE)
    order = rng.permutation(len(pieces))
    out = pieces[order[0]].copy()
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    for k in order[1:]:
        p = pieces[k]
        if len(p) > fade and len(out) > fade:
            out[-fade:] = out[-fade:] * (1 - ramp) + p[:fade] * ramp
            p = p[fade:]
        out = np.concatenate([out, p])
    return out.astype(np.float32)


def distill_live_motion(av: TrainedAvatar, ds, lookahead_s: float, steps: int, copies: int, noise: float,
                        seed: int = 0, lr: float = 1e-3, batch: int = 256, progress: bool = False) -> tuple[MotionNet, dict]:
    """A live motion net for `lookahead_s`: the avatar's MotionNet (the teacher) fine-tuned
    so that, fed what a live stream has heard of a frame's reach (LiveSpeech's windows:
    the running normalisation, future frames cut short or held), it gives the codes the
    teacher gives the whole clip offline. Lips move before the sound they make, so the
    offline net reads 6 frames ahead; at 80 ms a stream has heard 2 of them, partly.
    Trained on the training frames' speech only (ds.split's held-out tail is left out), in
    `copies` time-shifted, reordered and speed-perturbed versions (speech_copies): on the
    clip alone the net learnt its few seconds by heart (HDTF: 1.12 dB of held-out face
    PSNR lost to the offline codes instead of 0.99), and on the clip in its own order it
    learnt what comes next in it, which other voices do not say. Loss: the codes' squared
    error plus the inner-lip gap's (in units of its variance), with noise of std `noise` on
    the mel and the net's dropout, as MotionNet's own fit (recon/motion.py). Returns (the net, in eval
    mode on the host; figures for the file's metadata)."""
    from capture import compute_features
    from tqdm import tqdm

    t0 = time.perf_counter()
    teacher = copy.deepcopy(av.motion_net).cpu().eval()
    reach, fps = teacher.reach, av.fps
    train_ids, _ = ds.split(holdout_cameras=list(av.meta.get("holdout_cameras", [])))
    train_end_s = (max(int(ds.frames[i]["frame_index"]) for i in train_ids) + 1) / fps
    pcm = load_audio_file(ds)
    pcm = pcm[: int(train_end_s * SAMPLE_RATE)]  # the held-out tail's speech is never heard
    bank_mel, bank_vis, windows, targets, start = [], [], [], [], 0
    plan = speech_copies(pcm, copies, seed)
    for shift, speed, x in tqdm(plan, desc="live motion: speech copies", unit="copy", disable=not progress,
                                file=sys.stderr, dynamic_ncols=True):
        n = int(np.ceil(len(x) / SAMPLE_RATE * fps - 1e-6))
        feats = compute_features(x, n, fps)
        with torch.no_grad():
            target = teacher.raw(normalize_mel(feats["mel"]), viseme_features(feats))  # [n, K]
        rec = _Windows(av, lookahead_s, ds.features["mel"][: int(train_end_s * fps)])
        rec.stream_all(x)
        for k, (idx, at) in enumerate(rec.windows[:n]):
            if at == reach and len(idx) == 2 * reach + 1:  # the stream's first frames have less past
                windows.append([start + i for i in idx])
                targets.append(target[k])
        bank_mel += [f["mel_norm"] for f in rec.bank]
        bank_vis += [torch.as_tensor(np.asarray(f["visemes"], np.float32)) for f in rec.bank]
        start += len(rec.bank)
    if not windows:
        raise AvatarError(ds.root, "has too little training speech to distil a live motion net from")
    bank_mel, bank_vis = torch.stack(bank_mel), torch.stack(bank_vis)
    windows, targets = torch.tensor(windows), torch.stack(targets)
    data_s = time.perf_counter() - t0

    student = copy.deepcopy(teacher)
    axis = student.lip_axis
    gap_scale = (targets @ axis).var().clamp_min(1e-12) if axis.any() else None

    def loss_of(net: MotionNet, pick: Tensor, g: torch.Generator | None) -> Tensor:
        mel = bank_mel[windows[pick]]  # [B, W, 16, 80]
        if g is not None and noise > 0:
            mel = mel + noise * torch.randn(mel.shape, generator=g)
        pred, want = net.raw_windows(mel, bank_vis[windows[pick]])[:, reach], targets[pick]
        loss = F.mse_loss(pred, want)
        return loss if gap_scale is None else loss + F.mse_loss(pred @ axis, want @ axis) / gap_scale

    every = torch.arange(len(targets))
    with torch.no_grad():
        before = float(torch.stack([loss_of(teacher, p, None) for p in every.split(batch)]).mean())
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-3)
    student.train()
    bar = tqdm(total=steps, desc="live motion: distil", unit="it", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # the dropout's draws (on the host)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * 0.1 ** (step / max(steps - 1, 1))
            loss = loss_of(student, torch.randint(len(targets), (min(batch, len(targets)),), generator=g), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    student.eval()
    with torch.no_grad():
        after = float(torch.stack([loss_of(student, p, None) for p in every.split(batch)]).mean())
    return student, {"copies": [[shift, speed] for shift, speed, _ in plan], "windows": len(targets),
                     "steps": steps, "error_before": before, "error_after": after,
                     "data_s": round(data_s, 1), "seconds": round(time.perf_counter() - t0, 1)}


def load_audio_file(ds) -> np.ndarray:
    """The dataset's speech, 16 kHz mono (AvatarError where it keeps none)."""
    from capture import load_audio

    if not ds.meta.get("audio") or not (ds.root / ds.meta["audio"]).is_file():
        raise AvatarError(ds.root, "keeps no audio file, so no live motion net can be distilled",
                          "capture the clip again with this version")
    return load_audio(ds.root / ds.meta["audio"])


def ensure_live_motion(root: Path, cfg=None, dataset: Path | None = None, progress: bool = True) -> dict | None:
    """Distil the live motion net of the trained avatar in `root` (cfg: the run's config,
    by default the avatar's: live_lookahead_ms, live_motion_steps, live_copies; dataset:
    the run's, by default the avatar's), unless it has an up-to-date one already, or speaks
    through no motion net, or live_lookahead_ms is 0. Written to root/LIVE_MOTION, after
    removing one that is stale or damaged; its figures are returned (None where nothing was
    done). Where it cannot be made (no audio stack, too little speech, the dataset gone), a
    warning: the avatar stands, and live speech drives its offline net."""
    av = load_avatar(root)
    cfg = cfg or av.config
    lookahead_ms = float(getattr(cfg, "live_lookahead_ms", 0.0))
    if not lookahead_ms or av.motion_net is None or not av.meta.get("speech", True):
        return None
    if live_motion_net(av, lookahead_ms / 1000)[0] is not None:
        return None
    (root / LIVE_MOTION).unlink(missing_ok=True)  # stale or damaged: never left to be mistaken for the new one
    try:
        ds = Dataset(dataset or av.dataset, size=av.size, cache_frames=8)
        net, figures = distill_live_motion(av, ds, lookahead_ms / 1000, cfg.live_motion_steps, cfg.live_copies,
                                           cfg.audio_noise, cfg.seed, progress=progress)
    except (ImportError, AvatarError) as exc:
        why = (f"it needs the audio stack, and {exc.name} is not installed" if isinstance(exc, ImportError)
               else f"{exc.path}: {exc.problem}" if exc.path else exc.problem)
        print(f"warning: no live motion net ({why}); live speech will drive the offline net", file=sys.stderr)
        return None
    meta = {"kind": "live-motion", "lookahead_ms": lookahead_ms, "teacher": tensors_digest(av.motion_net.state_dict()),
            **figures}
    save_checkpoint(root / LIVE_MOTION, {f"net.{k}": v for k, v in net.state_dict().items()}, meta)
    return meta


class LiveRenderer:
    """Renders live frames into one camera (yaw, pitch degrees from the capture's mean
    view) at `size`, over the 3D torso where the avatar has one, and encodes them."""

    def __init__(self, av: TrainedAvatar, size: int, yaw: float = 0.0, pitch: float = 0.0, jpeg_quality: int = 90):
        self.av, self.size, self.quality = av, size, jpeg_quality
        self.viewmat = CameraRig(av, None).at(yaw, pitch)
        self.K, plate = scaled(av, size)
        with torch.no_grad():
            self.under = behind(av, "3d" if av.has_torso else "none", self.viewmat, self.K, size, plate)

    def render(self, frame: LiveFrame) -> tuple[np.ndarray, bytes, dict]:
        """(image [S, S, 3] uint8 RGB, its JPEG, {deform, rasterize, encode} milliseconds)."""
        ms = {}
        with torch.no_grad():
            t = time.perf_counter()
            eye = torch.tensor([[frame.eye]], device=self.av.device)
            pose = self.av.deform(frame.codes[None].to(self.av.device), eye)[0]
            t, ms["deform"] = time.perf_counter(), (time.perf_counter() - t) * 1000
            image, _ = self.av.render_head(pose, self.viewmat, self.K, self.size).over(self.under)
            rgb = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()  # host: to the encoder
            t, ms["rasterize"] = time.perf_counter(), (time.perf_counter() - t) * 1000
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        ms["encode"] = (time.perf_counter() - t) * 1000
        return rgb, jpeg.tobytes(), ms


def speak(avatar: str | Path, audio: str | Path, realtime: bool = True, lookahead_s: float = 0.08,
          size: int | None = None, chunk_ms: float = 20.0, out: str | Path | None = None,
          device: torch.device | str = "cpu") -> dict:
    """Stream a speech file through the live path, as a microphone would deliver it: in
    `chunk_ms` chunks, at its own pace (`realtime`), or all at once with every frame
    rendered (throughput; the latencies are then not a microphone's). Returns
    the report: frames rendered and skipped, the sustained frame rate, and the median
    and 90th-percentile latency per stage (module docstring); `out`: the frames shown,
    each held until the next, as an mp4 with the speech."""
    av = load_avatar(avatar, device)
    av.check_speech()
    size = size or av.size
    if out is not None and size % 2:
        raise AvatarError(Path(out), f"--size {size} must be even (H.264 needs even frame sizes)")
    pcm = load_speech(Path(audio), av.fps)
    ds = open_dataset(av, size, required=False)
    live = LiveSpeech(av, lookahead_s, None if ds is None else ds.features["mel"])
    renderer = LiveRenderer(av, size)
    chunk = max(1, int(round(chunk_ms / 1000 * SAMPLE_RATE)))
    chunks: queue.Queue = queue.Queue()
    t0 = time.perf_counter()

    def microphone() -> None:  # delivers each chunk once its last sample has been "spoken"
        for start in range(0, len(pcm), chunk):
            end = min(start + chunk, len(pcm))
            if realtime:
                time.sleep(max(0.0, t0 + end / SAMPLE_RATE - time.perf_counter()))
            chunks.put((time.perf_counter(), pcm[start:end]))
        chunks.put(None)

    feeder = threading.Thread(target=microphone, daemon=True)
    feeder.start()
    rows, shown, skipped, ended = [], [], 0, False
    while not ended:
        pending = [chunks.get()]
        while not chunks.empty():
            pending.append(chunks.get())
        ready: list[tuple[LiveFrame, float, float]] = []  # (frame, chunk arrival, push start)
        for item in pending:
            start = time.perf_counter()
            if item is None:
                ended = True
                frames = live.flush()
                arrived = start
            else:
                arrived, samples = item
                frames = live.push(samples)
            ready += [(f, arrived, start) for f in frames]
        if not ready:
            continue
        if realtime:  # the newest: a live view skips rather than lags
            skipped += len(ready) - 1
            ready = ready[-1:]
        for frame, arrived, start in ready:
            rgb, _, ms = renderer.render(frame)
            done = time.perf_counter()
            sound = t0 + frame.index / av.fps
            rows.append({"index": frame.index, "total": (done - sound) * 1000, "buffering": (arrived - sound) * 1000,
                         "queue": (start - arrived) * 1000, **frame.ms, **ms})
            if out is not None:  # kept for the video only: minutes of frames are hundreds of MB
                shown.append((frame.index, rgb))
    seconds = len(pcm) / SAMPLE_RATE
    report = {"avatar": str(avatar), "audio": str(audio), "realtime": realtime, "lookahead_ms": lookahead_s * 1000,
              "motion": live.motion_note, "size": size, "device": str(av.device), "frames": len(rows) + skipped, "rendered": len(rows),
              "skipped": skipped, "seconds": round(seconds, 2),
              "sustained_fps": round(len(rows) / max(seconds if realtime else time.perf_counter() - t0, 1e-9), 2),
              "latency_ms": {stage: _spread([r[stage] for r in rows]) for stage in ("total", *STAGES)}}
    if out is not None:
        report["video"] = str(_write_shown(out, shown, len(rows) + skipped, av.fps, pcm))
    return report


def _spread(values: list[float]) -> dict:
    if not values:
        raise AvatarError(None, "no frame was rendered", "give speech of at least one video frame")
    return {"median": round(statistics.median(values), 1), "p90": round(float(np.percentile(values, 90)), 1)}


def _write_shown(out: str | Path, shown: list[tuple[int, np.ndarray]], frames: int, fps: float,
                 pcm: np.ndarray) -> Path:
    """The frames a live view showed, each held until the next, with the speech."""
    def video():
        j = 0
        for k in range(frames):
            while j + 1 < len(shown) and shown[j + 1][0] <= k:
                j += 1
            yield shown[j][1]

    return write_mp4(out, video(), fps, audio=pcm)
