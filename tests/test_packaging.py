"""A non-editable install finds every config: the wheel carries conf/ as dgrun/conf."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT


def test_the_wheel_ships_every_config_and_the_installed_package_finds_them(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("dgrun-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped and {f"dgrun/{p}" for p in shipped} <= names
    assert "dgrun/cli.py" in names and any(n.endswith("entry_points.txt") for n in names)
    assert "dgrun/templates/array.sbatch" in names  # what `dgrun slurm` renders

    # Import the unpacked wheel, not the source tree: this is what `pip install .` gives.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import dgrun.cli as c; d = c.config_dir(); print(d);"
             "from hydra import compose, initialize_config_dir;"
             "from dgrun.config import register_schemas, from_hydra; register_schemas();"
             "initialize_config_dir(config_dir=str(d), version_base='1.3');"
             "print(from_hydra(compose('config', overrides=['experiment=zhang2017_fig1a'])).model.name)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    conf_dir, model = out.stdout.split()
    assert Path(conf_dir) == site / "dgrun" / "conf" and model == "mlp1"
