"""A built wheel carries every package and conf/, and runs the CLI with every config group."""

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mahalo").rglob("__init__.py")}
    assert found | {"mahalo.conf"} == listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 68:  # the backend pyproject asks for is here
            build.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    return next(out.glob("mahalo-*.whl"))


def test_wheel_ships_conf_and_assets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    conf = sorted(n for n in names if n.startswith("mahalo/conf/"))
    assert "mahalo/conf/decode.yaml" in conf
    for group in ("models", "objective", "search"):
        shipped = {Path(n).stem for n in conf if n.startswith(f"mahalo/conf/{group}/")}
        assert shipped == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}
    assert "mahalo/assets/smollm2_135m_truth_head.safetensors" in names


def test_cli_runs_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    script = """
import sys, mahalo, mahalo.decode as d
assert mahalo.__file__.startswith(sys.argv[1]), mahalo.__file__
assert str(d.CONF_DIR).startswith(sys.argv[1]), d.CONF_DIR
from mahalo.app.compose import search_presets  # the server's models: one per shipped search preset
assert list(search_presets()) == ["mahalo-" + n.replace("_", "-") for n in d.group_options("search")]
runs = [["search=" + s] for s in d.group_options("search")] + [["+objective=" + o] for o in d.group_options("objective")]
for extra in runs:
    args = ["models=tiny", "prompt=hi", "search.max_new_tokens=4", "search.num_candidates=2", *extra]
    if not any(a.startswith("+objective") for a in extra):
        args.append("+objective=truth")
    code = d.main(args)
    assert code == 0, (extra, code)
print("ran", len(runs))
"""
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(target)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ran " in done.stdout
