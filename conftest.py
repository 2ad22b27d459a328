"""Runs the Python snippets of README.md and docs/*.md as tests (Sybil), each document in a fresh temporary folder.

A snippet that cannot run here (it needs a network, a GPU or a data set) is preceded by
`<!-- skip: next "the reason" -->` and reported as skipped with that reason.
"""

import os

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser


@pytest.fixture
def snippet_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md"],
    fixtures=["snippet_folder"],
    excludes=[os.path.join("tests", "*")],
).pytest()
