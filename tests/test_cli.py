import subprocess
import sys

import pytest

from avatar.cli import main


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("capture", "train", "render", "view", "demo", "export", "eval", "bench"):
        assert cmd in out


def test_job_configs_in_scenes_parse(tmp_path):
    from scenes.job import JOB_DIR, load_job

    demo = load_job(JOB_DIR / "demo.toml", tmp_path / "d")
    assert demo.sample and demo.train["preset"] == "demo" and demo.render_camera == "orbit"
    assert demo.render_audio == [tmp_path / "d" / "sample" / "speech_b.wav"]
    phone = load_job(JOB_DIR / "phone_video.toml")
    assert phone.video.name == "me.mp4" and phone.capture == {"fps": 25.0, "size": 512}
    assert load_job(JOB_DIR / "ernerf_dataset.toml").ernerf.name == "obama"


def test_bad_job_configs_name_the_file(tmp_path, capsys):
    bad = tmp_path / "job.toml"
    for text, problem in [("[input\n", "is not valid TOML"), ("[input]\n", "needs exactly one input"),
                          ("[input]\nsample = true\n[trian]\n", "unknown sections"),
                          ("[input]\nsample = true\n[train]\nmethod = \"nerv\"\n", "unknown method 'nerv'"),
                          ("[input]\nsample = true\n[train]\nmethod = \"nerf\"\nsh_degree = 2\n",
                           "unknown config keys ['sh_degree']")]:
        bad.write_text(text)
        assert main(["run", str(bad)]) == 1
        err = capsys.readouterr().err
        assert "job.toml" in err and problem in err
    assert main(["run", str(tmp_path / "none.toml")]) == 1
    assert "job config not found" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "avatar", "--version"], capture_output=True, text=True, check=True)
    assert "avatar-studio" in r.stdout


def test_bench_raster_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "raster", "--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_internal_error_is_one_line_and_a_log(tmp_path, monkeypatch, capsys):
    import recon.export

    def broken(*args, **kwargs):
        raise ValueError("boom\nsecond line")

    monkeypatch.setenv("AVATAR_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(recon.export, "export", broken)
    assert main(["export", str(tmp_path / "av"), "--ply", str(tmp_path / "x.ply")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: internal error in export: ValueError: boom (details: ")
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in err
    text = log.read_text()
    assert "Traceback" in text and "second line" in text and "avatar export" in text
    assert not (tmp_path / "x.ply").exists()
