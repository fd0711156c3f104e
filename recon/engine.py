"""`avatar train`: the engine that fits any method (recon/method.py) to a captured dataset.

It owns what every method shares: the avatar folder (refusing to overwrite a trained one),
atomic periodic checkpoints and `--resume` (same samples and randomness as an
uninterrupted run), the Adam optimizer over the method's named parameter groups and their
schedules, batches of B views from the data manager (recon/datamanager.py), the device,
metrics.jsonl and the progress bar. Everything particular to a method (its parameters,
stages, renders, losses, densification) sits behind the Method interface; the talking
Gaussian avatar (recon/methods/gaussians.py) is the default method.
"""

from __future__ import annotations

import json
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
from .checkpoint import load_checkpoint
from .dataset import Dataset, dataset_fingerprint
from .datamanager import DataManager
from .method import DEFAULT_METHOD, Method, checkpoint_method, method_class
from .raster.api import check_backend

BOOKKEEPING = ("checkpoint_every", "log_every", "cache_frames", "backend")
"""Settings that do not change what is trained: never a reason to refuse a resume or retrain."""


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
    """

    def __init__(self, dataset: Path, out: Path, cfg: Any | None, resume: bool, progress: bool = True,
                 force: bool = False, overrides: dict | None = None, device: torch.device | str = "cpu",
                 method: str | None = None, holdout_cameras: list[str] | None = None):
        self.out = Path(out)
        self.device = device = torch.device(device)
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
        self.cfg = cfg = cfg or cls.config(**(overrides or {}))
        self.dataset_fingerprint = dataset_fingerprint(Path(dataset))
        check_backend(cfg.backend, device)
        self.ds = Dataset(dataset, size=cfg.size, cache_frames=cfg.cache_frames, check_images=True, device=device)
        self.holdout_cameras = list(holdout_cameras or [])
        self.train_ids, self.held_out = self.ds.split(holdout_cameras=self.holdout_cameras)
        self.method: Method = cls(self.ds, self.train_ids, cfg, device)
        self.step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            tensors, meta = resumed
            self.method.restore(tensors, meta, ckpt)
            self.optim = torch.optim.Adam(self.method.param_groups())
            load_optimizer_tensors(self.optim, tensors)
            self.step = int(meta["step"])
            for stale in self.out.glob(".*.tmp*"):  # a write cut short by a crash
                stale.unlink()
            self._trim_metrics()
            print(f"avatar train: resuming {self.out} from step {self.step}", file=sys.stderr)
        else:
            if resume:
                print(f"avatar train: {ckpt} not found; starting from the beginning", file=sys.stderr)
            torch.manual_seed(cfg.seed)
            self.method.create(self.out, progress)
            self.optim = torch.optim.Adam(self.method.param_groups())
        self.data = DataManager(self.ds, self.train_ids, cfg.batch_size, cfg.seed)

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

    def save(self) -> Path:
        """Write the checkpoint (atomically) and config.json."""
        return save_avatar(self.out, {**self.method.state_tensors(), **optimizer_tensors(self.optim)}, self.meta())

    # -- one step ----------------------------------------------------------------------
    def set_learning_rates(self, step: int) -> None:
        for g in self.optim.param_groups:
            g.setdefault("base_lr", g["lr"])  # the rate a group was created with
            g["lr"] = self.method.learning_rate(g, step)

    def optimize(self, step: int) -> tuple[torch.Tensor, dict]:
        """One optimizer step at `step` on the data manager's batch: render, loss, gradients,
        the method's statistics, update. Returns the loss and the step's info."""
        batch = self.data.batch(step)
        outputs = self.method.render(batch, step)
        loss, info = self.method.loss(batch, outputs, step)
        if not torch.isfinite(loss):
            raise AvatarError(self.out, f"training diverged at step {step} (loss {float(loss)})",
                              "resume from the last checkpoint with --resume after lowering learning rates")
        loss.backward()
        self.method.after_backward(batch, outputs)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return loss, info

    def run(self, progress: bool = True) -> Path:
        cfg, method = self.cfg, self.method
        t_start, done_at_start = time.perf_counter(), self.step
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="avatar train", unit="it", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        log = open(self.out / "metrics.jsonl", "a")
        try:
            while self.step < cfg.total_steps:
                step = self.step
                event = method.before_step(step, self.optim, progress)
                if event.pop("finished", False):
                    self.step = cfg.total_steps
                    self.save()
                    break
                self.set_learning_rates(step)
                loss, info = self.optimize(step)
                self.step = step + 1
                event.update(method.after_step(self.step, self.optim, progress))
                bar.update(1)
                bar.set_postfix(stage=method.stage_at(step), loss=f"{loss.item():.4f}",
                                **{k: f"{v:.2f}" for k, v in info.items()}, refresh=False)
                milestone = self.step == cfg.total_steps or self.step in method.milestones()
                if self.step % cfg.log_every == 0 or event or milestone:
                    elapsed = time.perf_counter() - t_start
                    record = {"step": self.step, "stage": method.stage_at(step), "loss": loss.item(), **info,
                              **method.log_fields(), "it_per_s": (self.step - done_at_start) / max(elapsed, 1e-9),
                              "elapsed_s": elapsed, **event}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step % cfg.checkpoint_every == 0 or milestone:
                    self.save()
                    method.saved()
        finally:
            log.close()
            bar.close()
            self.data.close()
        method.finish(self.out)
        return self.out


def train(dataset: str | Path, out: str | Path, cfg: Any | None, resume: bool = False, progress: bool = True,
          force: bool = False, overrides: dict | None = None, device: torch.device | str = "cpu",
          method: str | None = None, holdout_cameras: list[str] | None = None) -> Path:
    """Train (or resume) an avatar with `method` on `device` (recon/device.py); returns the
    avatar folder. See the module docstring and Trainer."""
    trainer = Trainer(Path(dataset), Path(out), cfg, resume, progress, force, overrides, device, method,
                      holdout_cameras)
    if trainer.step >= trainer.cfg.total_steps:
        print(f"avatar train: {out} is already trained ({trainer.step} steps)", file=sys.stderr)
        trainer.data.close()
        trainer.method.finish(trainer.out)
        return trainer.out
    return trainer.run(progress)
