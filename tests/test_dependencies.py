"""pyproject.toml tells the truth: every third-party module the code imports is declared
(as a dependency, or in the extra of the code that needs it), and every declared
dependency is imported somewhere."""

import ast
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("avatar", "capture", "recon", "viewer", "scenes", "bench")
NOT_IMPORTED = {"ninja": "torch.utils.cpp_extension runs it to build our kernels"}
OPTIONAL_IMPORTS = {"pycolmap": "multiview", "nerfacc": "nerf"}
"""Modules imported only inside the function that needs them (with a named error naming
the extra when missing) -> their extra."""


def _name(requirement: str) -> str:
    for sep in "=<>!~[; ":
        requirement = requirement.split(sep)[0]
    return requirement.lower().replace("_", "-")


def imported_modules(folders) -> dict[str, set[str]]:
    """Top-level modules imported by the .py files under `folders` -> the files importing them."""
    out: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                      and node.args and isinstance(node.args[0], ast.Constant)):
                    names = [node.args[0].value]  # pytest.importorskip("module")
                else:
                    continue
                for name in names:
                    out.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return out


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """{distribution name: files} of the modules that are neither stdlib nor ours."""
    ours = set(RUNTIME) | {p.stem for p in (ROOT / "tests").glob("*.py")}
    owners = packages_distributions()
    out: dict[str, set[str]] = {}
    for module, files in modules.items():
        if module in sys.stdlib_module_names or module in ours or module == "__future__":
            continue
        if module not in owners:
            pytest.fail(f"{module} (imported by {sorted(files)}) is not installed")
        for dist in owners[module]:
            out.setdefault(_name(dist), set()).update(files)
    return out


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return ({_name(r) for r in project["dependencies"]},
            {extra: {_name(r) for r in reqs} for extra, reqs in project.get("optional-dependencies", {}).items()})


def test_every_import_is_declared_and_every_dependency_imported():
    deps, extras = declared()
    runtime = third_party(imported_modules(RUNTIME))
    tests = third_party(imported_modules(["tests"]))
    # mediapipe installs these too; only what we import ourselves must be declared.
    missing = {d: sorted(f) for d, f in runtime.items()
               if d not in deps and d not in extras.get(OPTIONAL_IMPORTS.get(d, ""), set())}
    assert not missing, f"imported but not declared in [project] dependencies: {missing}"
    for extra, members in extras.items():
        if extra != "test":
            unused = members - set(runtime)
            assert not unused, f"declared in the {extra} extra but never imported: {sorted(unused)}"
    installed_by_ci = set().union(*extras.values())  # .ci/run installs every extra
    missing = {d: sorted(f) for d, f in tests.items() if d not in deps | installed_by_ci}
    assert not missing, f"imported by tests but not declared (dependencies or an extra): {missing}"
    unused = deps - set(runtime) - set(NOT_IMPORTED)
    assert not unused, f"declared in [project] dependencies but never imported: {sorted(unused)}"
    unused = extras["test"] - set(tests)
    assert not unused, f"declared in the test extra but never imported by the tests: {sorted(unused)}"


def _imports_of(folder: str, package: str) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, module, names) of every import of `package` (or its modules) under folder."""
    out = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                    and node.module.split(".")[0] == package:
                out.append((str(path.relative_to(ROOT)), node.lineno, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out += [(str(path.relative_to(ROOT)), node.lineno, a.name, []) for a in node.names
                        if a.name.split(".")[0] == package]
    return out


def test_data_flows_one_way_through_the_dataset_format():
    """video -> capture -> dataset folder -> recon -> avatar -> viewer: recon and the viewer
    read the dataset through avatar/dataset_format.py and use of capture only the tools its
    package exports (capture/__init__.py); no stage imports a later one."""
    import capture

    reaching_in = [(f, line, module, names) for folder in ("recon", "viewer")
                   for f, line, module, names in _imports_of(folder, "capture")
                   if module != "capture" or not set(names) <= set(capture.__all__)]
    assert not reaching_in, f"imports of capture's internals: {reaching_in}"
    backwards = _imports_of("capture", "recon") + _imports_of("capture", "viewer") + _imports_of("recon", "viewer")
    assert not backwards, f"imports of a later stage: {backwards}"


def _module_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import in one file, relative ones resolved."""
    package = ".".join(path.relative_to(ROOT).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = node.module if not node.level else ".".join(p for p in (base, node.module) if p)
            out.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
    return out


def test_render_eval_export_and_view_use_only_the_trained_avatar_interface():
    """What a trained avatar is made of belongs to its method: the commands that use one go
    through recon/method.py's TrainedAvatar (and write .ply through the 3DGS file format)."""
    internals = ("recon.model", "recon.torso", "recon.motion", "recon.deform", "recon.densify", "recon.init",
                 "recon.methods", "recon.config", "recon.raster", "recon.fields")
    allowed = {"recon.gaussians": {"save_ply"}, "recon.raster": {"rasterize"}}  # the .ply writer; the viewer's dots
    reaching_in = [(str(f.relative_to(ROOT)), line, module, names)
                   for f in (ROOT / "recon/render.py", ROOT / "recon/evaluate.py", ROOT / "recon/export.py",
                             *(ROOT / "viewer").glob("avatar_*.py"))
                   for line, module, names in _module_imports(f)
                   if (module == "recon.gaussians" or module.startswith(internals))
                   and not set(names) <= allowed.get(module, set())]
    assert not reaching_in, f"imports of a method's internals: {reaching_in}"


def test_every_package_is_installed():
    """A wheel (not only an editable install) holds every Python package of the project."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(init.parent.relative_to(ROOT)).replace("/", ".") for folder in RUNTIME
             for init in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


AUDIO_VIDEO_VIEWER = ("av", "soundfile", "pocketsphinx", "silero_vad", "viser")


def _run_without(modules: tuple[str, ...], code: str) -> None:
    """Run `code` in a fresh interpreter where `modules` cannot be imported."""
    prelude = (f"import sys\nfor m in {modules!r}:\n    sys.modules[m] = None\n"
               f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n")
    r = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_training_needs_neither_the_face_tracker_nor_the_audio_stack(sample_dataset, tmp_path):
    """Training reads the dataset folder alone: with mediapipe, av, soundfile, pocketsphinx,
    silero-vad and viser unimportable (as on a GPU image without them), an avatar trains."""
    _run_without(("mediapipe", *AUDIO_VIDEO_VIEWER),
                 "from _scenes import TINY_TRAIN\n"
                 "from recon.config import preset\n"
                 "from recon.engine import train\n"
                 f"train({str(sample_dataset)!r}, {str(tmp_path / 'avatar')!r},\n"
                 "      preset('cpu', **{**TINY_TRAIN, 'iterations': 10, 'torso_steps': 4}), progress=False)\n")
    assert (tmp_path / "avatar" / "canonical.ply").is_file()
    assert not (tmp_path / "avatar" / "live_motion.safetensors").exists()  # it needs the audio stack: warned, none


def test_held_out_evaluation_needs_no_video_or_audio_stack(trained_avatar, tmp_path):
    """`avatar eval` scores held-out frames from the dataset folder and the face tracker:
    with av, soundfile, pocketsphinx, silero-vad and viser unimportable, it runs."""
    import shutil

    avatar = shutil.copytree(trained_avatar, tmp_path / "avatar")  # eval writes into the folder
    _run_without(AUDIO_VIDEO_VIEWER,
                 "from recon.evaluate import evaluate\n"
                 f"r = evaluate({str(avatar)!r}, progress=False, train_fit_frames=2, pose_fit_frames=1)\n"
                 "assert r['psnr'] > 10, r['psnr']\n"
                 "assert r['live_speech']['skipped'].startswith('live speech needs the audio stack'), r['live_speech']\n")
