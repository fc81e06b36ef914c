"""The project installed from its wheel (not editable), in a fresh venv, finds the configs it ships.

The wheel is built from a copy of the package sources (nothing is written into the checkout), installed with
``--no-deps`` into a new venv whose dependencies come from the test's own environment (a ``.pth`` line: torch and
DeepSpeed are not installed a second time), and run from a folder that has no ``configs/``: a run YAML naming bare
``base`` configs (``model: sepvit_lite_32``, ``data: digits``) and ``--profile local`` resolve to the installed copies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import REPO

SOURCES = ("pretrain", "launch", "data_pipeline", "configs", "pyproject.toml", "README.md")


def _run(*argv: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    out = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_in_a_fresh_venv_finds_its_configs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(REPO / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp_path, cwd=src)
    (wheel,) = tmp_path.glob("vitpretrain-*.whl")
    shipped = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("vitpretrain_configs/"))
    configs = REPO / "configs"
    in_repo = sorted(f"vitpretrain_configs/{p.relative_to(configs)}" for p in configs.rglob("*.yaml"))
    assert shipped == in_repo

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    site = Path(_run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp_path).stdout.strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # appended after the venv's own
    _run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    where = _run(venv / "bin" / "python", "-c", "import pretrain.config as c; print(c.__file__); print(c.CONFIGS_DIR)",
                 cwd=work).stdout.split()  # fmt: skip
    assert where[0].startswith(str(site)) and where[1] == str(site / "vitpretrain_configs"), where
    (work / "run.yaml").write_text("base: {model: sepvit_lite_32, data: digits}\nrun: {name: from_wheel}\n")
    out = _run(venv / "bin" / "pretrain", "submit", "run.yaml", "data.path=data", "--profile", "local", "--dry-run",
               cwd=work)  # fmt: skip
    assert "#SBATCH" in out.stdout and "from_wheel" in out.stdout, out.stdout[-2000:]
