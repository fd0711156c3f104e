"""`avatar train`: the engine that fits any method (recon/method.py) to a captured dataset.

It owns what every method shares: the avatar folder (refusing to overwrite a trained one),
atomic periodic checkpoints and `--resume` (same samples and randomness as an
uninterrupted run), the Adam optimizer over the method's named parameter groups and their
schedules, batches of B views from the data manager (recon/datamanager.py), the device,
metrics.jsonl and the progress bar, and the sharing of each step over several processes
(recon/distributed.py: data parallel, gradients summed). Everything particular to a method (its parameters,
stages, renders, losses, densification) sits behind the Method interface; the talking
Gaussian avatar (recon/methods/gaussians.py) is the default method.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from avatar.errors import AvatarError
from avatar.io import atomic_path

from .avatar_dir import CHECKPOINT, read_json_lines, save_avatar
from . import distributed
from .checkpoint import decode_state, encode_state, load_checkpoint
from .dataset import Dataset, dataset_fingerprint
from .datamanager import DataManager
from .method import DEFAULT_METHOD, Method, checkpoint_method, method_class
from .raster.api import check_backend

BOOKKEEPING = ("checkpoint_every", "log_every", "cache_frames", "backend", "live_lookahead_ms", "live_motion_steps",
               "live_copies")
"""Settings that do not change what is trained: never a reason to refuse a resume or retrain
(the live motion net, recon/live.py, is distilled after training, from the run's settings)."""


def optimizer_tensors(optim: torch.optim.Adam) -> dict[str, torch.Tensor]:
    """Adam's moments and step counts, named by group: optim.<group>.<j>.{exp_avg,exp_avg_sq,step}."""
    out = {}
    for g in optim.param_groups:
        for j, p in enumerate(g["params"]):
            st = optim.state.get(p)
            if st:
                out[f"optim.{g['name']}.{j}.exp_avg"] = st["exp_avg"]
                out[f"optim.{g['name']}.{j}.exp_avg_sq"] = st["exp_avg_sq"]
                step = torch.as_tensor(st["step"], dtype=torch.float32, device="cpu")  # Adam keeps it on the host
                out[f"optim.{g['name']}.{j}.step"] = step.reshape(1)
    return out


def load_optimizer_tensors(optim: torch.optim.Adam, tensors: dict[str, torch.Tensor]) -> None:
    for g in optim.param_groups:
        for j, p in enumerate(g["params"]):
            key = f"optim.{g['name']}.{j}"
            if f"{key}.exp_avg" in tensors:
                optim.state[p] = {"step": tensors[f"{key}.step"].reshape(()).clone(),
                                  "exp_avg": tensors[f"{key}.exp_avg"].to(p.device, copy=True),
                                  "exp_avg_sq": tensors[f"{key}.exp_avg_sq"].to(p.device, copy=True)}


def saved_config(ckpt: Path, meta: dict) -> Any:
    """The config a checkpoint was trained with; AvatarError when it is unreadable."""
    cls = type(method_class(checkpoint_method(ckpt, meta)).config())
    try:
        return cls.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AvatarError(ckpt, f"has an unreadable config ({exc})", "train into a new --out") from exc


def checkpoint_differences(ckpt: Path, meta: dict, wanted: Any | None, dataset: Path) -> tuple[Any, list[str]]:
    """(the checkpoint's config, what differs from it: each setting of `wanted` other than
    BOOKKEEPING that is not the same, and the dataset when it was captured again or edited
    since)."""
    saved = saved_config(ckpt, meta)
    diffs = []
    if wanted is not None and type(wanted) is not type(saved):
        diffs.append(f"the method {checkpoint_method(ckpt, meta)!r} -> a config of {type(wanted).__name__}")
    elif wanted is not None:
        diffs = [f"{f.name} {getattr(saved, f.name)!r} -> {getattr(wanted, f.name)!r}" for f in fields(saved)
                 if f.name not in BOOKKEEPING and getattr(saved, f.name) != getattr(wanted, f.name)]
    fingerprint = dataset_fingerprint(dataset)
    if meta.get("dataset_fingerprint", fingerprint) != fingerprint:
        diffs.append("the dataset (captured again or edited since)")
    return saved, diffs


def resume_config(ckpt: Path, meta: dict, wanted: Any | None, dataset: Path, force: bool, overrides: dict) -> Any:
    """The config to resume a checkpoint with: its own with `overrides` applied, or
    `wanted` (a whole config: a preset or config file was given). Any difference from the
    checkpoint's, or a dataset changed since, stops with an error naming it, unless
    `force` (then the given settings are used)."""
    saved = saved_config(ckpt, meta)
    if wanted is None:
        wanted = replace(saved, **overrides)
    if type(wanted) is not type(saved):
        raise AvatarError(ckpt, f"was trained by the method {checkpoint_method(ckpt, meta)!r}",
                          "resume it with that method's settings, or train into a new --out")
    _, diffs = checkpoint_differences(ckpt, meta, wanted, dataset)
    if diffs and not force:
        raise AvatarError(ckpt, f"was trained with other settings or data: {'; '.join(diffs)}",
                          "resume without settings to keep the checkpoint's, pass --force to go on with the new "
                          "ones, or train into a new --out")
    if diffs:
        print(f"avatar train: --force: resuming {ckpt} with {'; '.join(diffs)}", file=sys.stderr)
    return wanted


class Trainer:
    """State of one training run: the method, its optimizer, the data manager, and the loop.

    cfg: the method's config (None: the checkpoint's when resuming, else the method's
    default preset; `overrides` apply over either). method: its name (None: the
    checkpoint's when resuming, else gaussians). holdout_cameras: cameras of the dataset kept
    out of training (Dataset.split; None: the checkpoint's when resuming, else none).

    In a run of several processes (recon/distributed.py, joined before this is built), rank
    0 reads the arguments and the avatar folder as one process would, and hands its state
    to the others, which take everything (method, settings, step) from it.
    """

    def __init__(self, dataset: Path, out: Path, cfg: Any | None, resume: bool, progress: bool = True,
                 force: bool = False, overrides: dict | None = None, device: torch.device | str = "cpu",
                 method: str | None = None, holdout_cameras: list[str] | None = None):
        self.out = Path(out)
        self.device = device = torch.device(device)
        self.ranks = distributed.current()
        if not self.ranks.first:
            tensors, meta = decode_state(distributed.broadcast_bytes(None, device), "rank 0's state")
            cls = method_class(meta["method"])
            self._setup(Path(dataset), cls, type(cls.config()).from_dict(meta["config"]), meta["holdout_cameras"])
            if meta["dataset_fingerprint"] != self.dataset_fingerprint:
                raise AvatarError(dataset, f"is not the dataset rank 0 trains on (rank {self.ranks.rank} has "
                                  "another capture or edit of it)", "give every machine the same dataset folder")
            self._restore(tensors, meta)
            return
        ckpt = self.out / CHECKPOINT
        if ckpt.exists() and not resume:
            raise AvatarError(self.out, "already holds a trained avatar",
                              "pass --resume to continue it, or choose another --out")
        resumed = load_checkpoint(ckpt) if resume and ckpt.exists() else None
        if resumed is not None:
            saved = checkpoint_method(ckpt, resumed[1])
            if method is not None and method != saved:
                raise AvatarError(ckpt, f"was trained by the method {saved!r}, not {method!r}",
                                  "resume without --method, or train into a new --out")
            method = saved
            saved_holdout = list(resumed[1].get("holdout_cameras", []))
            if holdout_cameras is not None and sorted(holdout_cameras) != sorted(saved_holdout):
                raise AvatarError(ckpt, f"was trained holding out cameras {saved_holdout or 'none'}, not "
                                  f"{holdout_cameras or 'none'}", "resume without --holdout-cameras, or train into a new --out")
            holdout_cameras = saved_holdout
            cfg = resume_config(ckpt, resumed[1], cfg, Path(dataset), force, overrides or {})
        cls = method_class(method or DEFAULT_METHOD)
        self._setup(Path(dataset), cls, cfg or cls.config(**(overrides or {})), holdout_cameras)
        self.out.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            self._restore(*resumed, ckpt)
            for stale in self.out.glob(".*.tmp*"):  # a write cut short by a crash
                stale.unlink()
            self._trim_metrics()
            print(f"avatar train: resuming {self.out} from step {self.step}", file=sys.stderr)
        else:
            if resume:
                print(f"avatar train: {ckpt} not found; starting from the beginning", file=sys.stderr)
            torch.manual_seed(self.cfg.seed)
            self.method.create(self.out, progress)
            self.optim = torch.optim.Adam(self.method.param_groups())
        if self.ranks.world > 1:
            distributed.broadcast_bytes(encode_state(self.state_tensors(), self.meta()), device)

    def _setup(self, dataset: Path, cls: type[Method], cfg: Any, holdout_cameras: list[str] | None) -> None:
        """The config, dataset, split, method (not yet built) and data manager."""
        self.cfg = cfg
        if cfg.batch_size < self.ranks.world:
            raise AvatarError(None, f"{self.ranks.world} processes share steps of {cfg.batch_size} view(s): each "
                              "process needs a view of every step", f"train with --batch-size {self.ranks.world} "
                              "or more (a rig: its camera count), or with fewer processes")
        self.dataset_fingerprint = dataset_fingerprint(dataset)
        check_backend(cfg.backend, self.device)
        self.ds = Dataset(dataset, size=cfg.size, cache_frames=cfg.cache_frames, check_images=True,
                          device=self.device)
        self.holdout_cameras = list(holdout_cameras or [])
        self.train_ids, self.held_out = self.ds.split(holdout_cameras=self.holdout_cameras)
        self.method: Method = cls(self.ds, self.train_ids, cfg, self.device)
        self.step = 0
        self.data = DataManager(self.ds, self.train_ids, cfg.batch_size, cfg.seed, ranks=self.ranks)

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict, path: Path | None = None) -> None:
        """The method, optimizer and step from a checkpoint's (or rank 0's) state."""
        self.method.restore(tensors, meta, path or self.out / CHECKPOINT)
        self.optim = torch.optim.Adam(self.method.param_groups())
        load_optimizer_tensors(self.optim, tensors)
        self.step = int(meta["step"])
        if "rng.cpu" in tensors:  # checkpoints of earlier versions have none
            torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)

    # -- bookkeeping -------------------------------------------------------------------
    def _trim_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from."""
        path = self.out / "metrics.jsonl"
        lines = [r for r in read_json_lines(path) if r["step"] <= self.step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def meta(self) -> dict:
        return {"step": self.step, "method": self.method.name, "config": self.cfg.to_dict(),
                "dataset": str(self.ds.root.resolve()), "dataset_fingerprint": self.dataset_fingerprint,
                "fps": float(self.ds.meta.get("fps", 25.0)), "size": self.cfg.size,
                "holdout_cameras": self.holdout_cameras, **self.method.state_meta()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint holds: the method's state, the optimizer's, and torch's
        global random state (what a method's modules draw when built mid-run)."""
        rng = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        return {**self.method.state_tensors(), **optimizer_tensors(self.optim), **rng}

    def save(self) -> Path:
        """Write the checkpoint (atomically) and config.json."""
        return save_avatar(self.out, self.state_tensors(), self.meta())

    def mend_replicas(self) -> bool:
        """In a run of several processes: whether any replica had drifted from rank 0's,
        which is then handed to every rank (recon/distributed.py)."""
        if self.ranks.world == 1:
            return False
        tensors = self.state_tensors()
        if distributed.replicas_agree(tensors, self.device):
            return False
        state = distributed.broadcast_bytes(encode_state(tensors, self.meta()) if self.ranks.first else None,
                                            self.device)
        if not self.ranks.first:
            self._restore(*decode_state(state, "rank 0's state"))
        return True

    # -- one step ----------------------------------------------------------------------
    def set_learning_rates(self, step: int) -> None:
        for g in self.optim.param_groups:
            g.setdefault("base_lr", g["lr"])  # the rate a group was created with
            g["lr"] = self.method.learning_rate(g, step)

    def optimize(self, step: int) -> tuple[float, dict]:
        """One optimizer step at `step` on the data manager's batch: render, loss, gradients
        (summed over the processes), the method's statistics, update. Returns the loss and
        the step's info, over the whole step."""
        batch = self.data.batch(step)
        outputs = self.method.render(batch, step)
        loss, info = self.method.loss(batch, outputs, step)
        share = len(batch) / batch.step_views  # of the step's views, over every process
        total, info = self._mean_over_ranks(loss, info, share)
        if not math.isfinite(total):
            raise AvatarError(self.out, f"training diverged at step {step} (loss {total})",
                              "resume from the last checkpoint with --resume after lowering learning rates")
        (loss * share).backward()
        distributed.sum_gradients([p for g in self.optim.param_groups for p in g["params"]])
        self.method.after_backward(batch, outputs)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return total, info

    def _mean_over_ranks(self, loss: torch.Tensor, info: dict, share: float) -> tuple[float, dict]:
        """The step's loss and log numbers over all its views (each process's weighed by its
        share of them)."""
        if self.ranks.world == 1:
            return loss.item(), info
        values = torch.tensor([loss.item(), *info.values()], dtype=torch.float64) * share
        values = distributed.sum_over_ranks(values.to(self.device)).tolist()
        return values[0], dict(zip(info, values[1:]))

    def run(self, progress: bool = True) -> Path:
        cfg, method, first = self.cfg, self.method, self.ranks.first
        progress = progress and first
        t_start, done_at_start = time.perf_counter(), self.step
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="avatar train", unit="it", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        log = open(self.out / "metrics.jsonl", "a") if first else None
        try:
            while self.step < cfg.total_steps:
                step = self.step
                event = method.before_step(step, self.optim, progress)
                if event.pop("finished", False):
                    self.step = cfg.total_steps
                    self.checkpoint()
                    break
                self.set_learning_rates(step)
                loss, info = self.optimize(step)
                self.step = step + 1
                event.update(method.after_step(self.step, self.optim, progress))
                if event and self.mend_replicas():
                    event["replicas_mended"] = True
                bar.update(1)
                bar.set_postfix(stage=method.stage_at(step), loss=f"{loss:.4f}",
                                **{k: f"{v:.2f}" for k, v in info.items()}, refresh=False)
                milestone = self.step == cfg.total_steps or self.step in method.milestones()
                if log is not None and (self.step % cfg.log_every == 0 or event or milestone):
                    elapsed = time.perf_counter() - t_start
                    record = {"step": self.step, "stage": method.stage_at(step), "loss": loss, **info,
                              **method.log_fields(), "it_per_s": (self.step - done_at_start) / max(elapsed, 1e-9),
                              "elapsed_s": elapsed, **event}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step % cfg.checkpoint_every == 0 or milestone:
                    self.checkpoint()
                    method.saved()
        finally:
            if log is not None:
                log.close()
            bar.close()
            self.data.close()
        if first:
            self.finish(progress)
        return self.out

    def finish(self, progress: bool) -> None:
        """The end-of-training artifacts: the method's, then the live motion net
        (recon/live.py) where the avatar speaks through a motion net."""
        from .live import ensure_live_motion

        self.method.finish(self.out)
        ensure_live_motion(self.out, self.cfg, self.ds.root, progress)

    def checkpoint(self) -> None:
        """Rank 0 writes the checkpoint, once every replica is known to hold its state."""
        self.mend_replicas()
        if self.ranks.first:
            self.save()


def train(dataset: str | Path, out: str | Path, cfg: Any | None, resume: bool = False, progress: bool = True,
          force: bool = False, overrides: dict | None = None, device: torch.device | str = "cpu",
          method: str | None = None, holdout_cameras: list[str] | None = None) -> Path:
    """Train (or resume) an avatar with `method` on `device` (recon/device.py); returns the
    avatar folder. See the module docstring and Trainer. Called on every rank of a run of
    several processes (recon/distributed.py) once they have joined."""
    trainer = Trainer(Path(dataset), Path(out), cfg, resume, progress, force, overrides, device, method,
                      holdout_cameras)
    if trainer.step >= trainer.cfg.total_steps:
        trainer.data.close()
        if trainer.ranks.first:
            print(f"avatar train: {out} is already trained ({trainer.step} steps)", file=sys.stderr)
            trainer.finish(progress)
        return trainer.out
    return trainer.run(progress)
