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


@pytest.mark.parametrize("cmd,issue", [("train", 5), ("render", 5), ("eval", 5), ("export", 5)])
def test_unbuilt_stage_says_so_and_fails(cmd, issue, capsys):
    assert main([cmd, "whatever"]) == 2
    err = capsys.readouterr().err
    assert f"avatar {cmd}: this stage is not built yet" in err and f"#{issue}" in err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "avatar", "--version"], capture_output=True, text=True, check=True)
    assert "avatar-studio" in r.stdout


def test_bench_raster_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "raster", "--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out
