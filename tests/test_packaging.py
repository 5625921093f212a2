"""Packaging: every subpackage and every config file ships, so a non-editable install works."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT


def test_every_subpackage_is_listed_in_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    on_disk = {"segtrain", "segtrain.conf"} | {
        f"segtrain.{p.parent.name}" for p in (ROOT / "segtrain").glob("*/__init__.py")
    }
    assert on_disk <= listed, f"add to setup.cfg [options] packages: {sorted(on_disk - listed)}"


@pytest.mark.slow
def test_wheel_contains_every_config_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("segtrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"segtrain/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
