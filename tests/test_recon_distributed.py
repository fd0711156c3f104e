"""Training over several processes (recon/distributed.py, `avatar train --nproc N`): two
gloo processes train as one process with the whole batch does; a rank killed mid-run
ends the run with a message naming it, the last checkpoint intact, and `--resume` with
another number of processes finishes it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _scenes import TINY_TRAIN
from recon.checkpoint import load_checkpoint
from recon.engine import train
from recon.config import preset


def _avatar(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-m", "avatar", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _config(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**TINY_TRAIN, "torso_steps": 0, "batch_size": 2, "motion_steps": 40, **settings}))
    return path


def _events(avatar: Path) -> list[dict]:
    keep = ("step", "densify", "replicas_mended")
    return [{k: v for k, v in json.loads(line).items() if k in keep}
            for line in (avatar / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_process_with_the_whole_batch(sample_dataset, tmp_path):
    """12 steps through the static, mouth, face and fuse stages, with a densification round
    in the mouth and in the face branch: every tensor of the checkpoint (parameters, Adam
    moments, densification statistics) as one process leaves it, within 1e-5, the same
    points split, and the replicas never drifted apart.

    The quaternions are frozen here: at the start every Gaussian is a sphere, so the
    gradient of its rotation is rounding noise, which Adam's 1e-15 epsilon turns into full
    steps of either sign. Any two runs that add up a step's sums in another order part
    there by the learning rate (one process on 1 thread against 2, as much as two
    processes against one); that would hide what this test is about."""
    settings = dict(iterations=12, densify_every=4, checkpoint_every=4, lr_quats=0.0)
    proc = _avatar("train", str(sample_dataset), "--out", str(tmp_path / "two"), "--nproc", "2",
                   "--config", str(_config(tmp_path, **settings)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes (one core each): the same sums
    try:
        train(sample_dataset, tmp_path / "one",
              preset("cpu", **{**TINY_TRAIN, "torso_steps": 0, "batch_size": 2, "motion_steps": 40, **settings}),
              progress=False)
    finally:
        torch.set_num_threads(threads)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("avatar: ") == 1  # rank 0 reports, once
    one, meta_one = load_checkpoint(tmp_path / "one" / "checkpoint.safetensors")
    two, meta_two = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert meta_one["step"] == meta_two["step"] == 12 and set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    events = _events(tmp_path / "two")
    assert events == _events(tmp_path / "one")
    assert sum("densify" in e for e in events) >= 2


def test_a_killed_rank_ends_the_run_and_resume_finishes_it_with_another_count(sample_dataset, tmp_path):
    cfg = _config(tmp_path, iterations=150, checkpoint_every=5)
    out = tmp_path / "avatar"
    proc = _avatar("train", str(sample_dataset), "--out", str(out), "--config", str(cfg), "--nproc", "2")
    ckpt = out / "checkpoint.safetensors"
    deadline = time.time() + 300
    while not (ckpt.is_file() and load_checkpoint(ckpt)[1]["step"] >= 10):
        assert proc.poll() is None and time.time() < deadline, "training ended before a rank could be killed"
        time.sleep(0.1)
    rank1 = _rank_pid(proc.pid, 1)
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-2:]
    killed_at = load_checkpoint(ckpt)[1]["step"]  # intact: it loads, checksum and all
    assert last[0].startswith(f"error: {out}: rank 1 (pid {rank1}) was killed by SIGKILL, which ended the run; "
                              f"the last checkpoint (step {killed_at}) is intact"), err[-2000:]
    assert "--resume" in last[1] and "Traceback" not in err
    assert 10 <= killed_at < 150
    # One process goes on from there, with the same samples per step.
    done = _avatar("train", str(sample_dataset), "--out", str(out), "--config", str(cfg), "--resume")
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-2000:]
    assert load_checkpoint(ckpt)[1]["step"] == 150
    steps = [e["step"] for e in _events(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 150
    assert not list(out.glob(".*.tmp*"))


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of training rank `rank` started by the process `launcher`."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{launcher}\n" in status.read_text() and \
                    f"RANK={rank}".encode() in (status.parent / "environ").read_bytes().split(b"\0"):
                return int(status.parent.name)
        except OSError:  # a process that ended meanwhile
            continue
    raise AssertionError(f"no rank {rank} among the children of {launcher}")


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc 0: at least one process trains"),
    (["--nproc", "2", "--batch-size", "1"], "2 processes share steps of 1 view(s)"),
    (["--nproc", "2", "--device", "cuda:0"], "--device"),
], ids=["none", "fewer-views", "one-gpu"])
def test_bad_process_counts_are_named_errors(sample_dataset, tmp_path, args, message):
    proc = _avatar("train", str(sample_dataset), "--out", str(tmp_path / "a"), "--iterations", "4", *args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and message in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "a" / "checkpoint.safetensors").exists()


def test_the_scaling_benchmark_times_each_process_count(sample_dataset, capsys):
    from avatar.cli import main

    assert main(["bench", "distributed", str(sample_dataset), "--nproc", "1", "2", "--preset", "demo",
                 "--steps", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(result["rows"]) == ["1", "2"] and result["batch_size"] == 2
    assert result["rows"]["1"]["speedup"] == 1.0 and result["rows"]["2"]["it_per_s"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason=f"NCCL between GPUs needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")
def test_two_gpus_train_one_avatar_over_nccl(sample_dataset, tmp_path):
    proc = _avatar("train", str(sample_dataset), "--out", str(tmp_path / "a"), "--device", "cuda", "--nproc", "2",
                   "--config", str(_config(tmp_path, iterations=12, densify_every=4)))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")[1]["step"] == 12
    assert not any("replicas_mended" in e for e in _events(tmp_path / "a"))
