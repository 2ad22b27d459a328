"""The documentation: the site builds strictly, the README stays a user's page, and the wheel's package list
covers every subpackage. (The snippets of README.md and docs/ run as tests through the root conftest.py.)"""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    # A broken link, anchor, snippet include or API reference is a warning, and --strict makes it an error.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def test_benchmark_tables_are_the_files_the_benchmark_writes():
    for page, included in [("deployment.md", "benchmarks/results/summary.md"),
                           ("benchmark-results.md", "benchmarks/results/results.md")]:
        assert f'--8<-- "{included}"' in (ROOT / "docs" / page).read_text()


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_subpackage_ships_in_the_wheel():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "cmsa_hf").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [options] packages in setup.cfg"
    assert "cmsa_hf.model_cards" in listed
