"""The extras table against setup.cfg, and the check that names the extra to install."""

import configparser
import re
import sys

import pytest
from conftest import REPO_ROOT

from cmsa_hf.extras import EXTRAS, MissingExtraError, missing_modules, require_extras


def setup_cfg_extras() -> dict[str, set[str]]:
    """setup.cfg's extras, each as the set of its distribution names (`%(other)s` lines left out)."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(REPO_ROOT / "setup.cfg")
    return {
        extra: {re.split(r"[<>=!~ ;\[]", line.strip())[0] for line in value.strip().splitlines() if "%(" not in line}
        for extra, value in config["options.extras_require"].items()
    }


def test_every_extra_names_the_distributions_of_setup_cfg():
    declared = setup_cfg_extras()
    for extra, modules in EXTRAS.items():
        assert extra in declared, f"setup.cfg has no extra {extra!r}"
        assert set(modules) == declared[extra], extra


def test_the_installed_extras_pass():
    for extra in ("train", "pose", "headpose"):
        assert missing_modules(extra) == {}
    require_extras("train", "pose", "headpose", needed_by="This test")


def test_a_missing_module_names_its_extra_and_the_install_command(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "pycocotools"] + ["pycocotools"]:
        monkeypatch.setitem(sys.modules, name, None)
    assert set(missing_modules("pose")) == {"pycocotools"}
    with pytest.raises(MissingExtraError, match=r"The keypoint task needs the `pose` extra .*pycocotools.*") as error:
        require_extras("train", "pose", needed_by="The keypoint task")
    assert str(error.value).endswith("pip install 'cmsa_hf[pose]'")


def test_an_unknown_extra_is_an_error():
    with pytest.raises(ValueError, match="cmsa_hf has no extra 'gpu'"):
        missing_modules("gpu")
