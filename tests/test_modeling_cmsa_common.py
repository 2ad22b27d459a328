"""transformers' own common model tests (`ModelTesterMixin`) against the four CMSA classes, in the style of
transformers' `tests/models/*/test_modeling_*.py`.

The mixin is not in the transformers wheel: it ships in the sdist of the same release, under `tests/`. The first
run downloads that sdist with pip and extracts its top-level `tests/*.py` into `.cache/transformers-tests/<version>/`
(git-ignored); the module skips only when that download fails. The sdist does not ship two sub-packages that
`test_modeling_common.py` imports: `tests/exporters/test_export.py` (`ExportTesterMixin`, the mixin's torch.export /
ONNX tests) and `tests/generation/test_utils.py` (`GenerationTesterMixin`, tests of `generate`). Both are stood in by
empty mixins here: CMSA cannot generate, and its export is tested by tests/test_export.py.

Choices for a 3-stage model:
- `hidden_states` are the three stage outputs, 4D maps (batch, C_i, H_i, W_i); the stem belongs to stage 1, so there
  is no separate embedding output: `expected_num_hidden_layers` = 3, and the 4D layout is checked by the override
  of `test_hidden_states_output` (as transformers' ConvNext / ResNet tests do).
- `num_hidden_layers` counts CMSA blocks, one per stage here (depths [1, 1, 1]): `attentions` has one entry per
  block. Three is the fewest blocks a 3-stage model has, one more than the mixin's usual bound of 2:
  `test_num_layers_is_small` asserts that bound (one block per stage) instead.
- In-tree models are listed in transformers' static Auto name mappings, which several mixin tests read to decide
  which inputs and checks apply; the CMSA classes are added to the fitting ones for this module's tests
  (`CMSAModel` as a base model, `CMSAForImageClassification` as an image classifier), and `_prepare_for_class`
  gives the keypoint and head-pose models their targets.
"""

import copy
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from torch import nn
from transformers.models.auto import modeling_auto

from cmsa_hf import (
    CMSAConfig,
    CMSAForHeadPoseEstimation,
    CMSAForImageClassification,
    CMSAForKeypointDetection,
    CMSAModel,
)


CACHE = Path(__file__).resolve().parents[1] / ".cache" / "transformers-tests"
PACKAGE = "transformers_release_tests"
# Sub-packages of transformers' tests/ that the sdist lacks, and the mixins test_modeling_common imports from them.
ABSENT_MIXINS = {"exporters.test_export": "ExportTesterMixin", "generation.test_utils": "GenerationTesterMixin"}


def fetch_release_tests(version: str) -> Path:
    """The folder holding `transformers_release_tests/` (the sdist's tests/*.py), downloaded on first use."""
    root = CACHE / version
    package = root / PACKAGE
    if (package / "test_modeling_common.py").is_file():
        return root
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        subprocess.run(
            [*command, f"transformers=={version}", "-d", download], check=True, capture_output=True, text=True, timeout=600
        )
        archive = next(Path(download).glob("transformers-*.tar.gz"))
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root))
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and re.fullmatch(r"[^/]+/tests/[^/]+\.py", member.name):
                    (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    (staging / "__init__.py").touch()
    try:
        staging.replace(package)  # atomic: a concurrent run sees all of it or none
    except OSError:
        if not (package / "test_modeling_common.py").is_file():
            raise
    return root


def import_model_tester_mixin():
    version = transformers.__version__
    try:
        root = fetch_release_tests(version)
    except (subprocess.SubprocessError, OSError, StopIteration) as error:
        details = getattr(error, "stderr", None) or error
        pytest.skip(
            f"transformers {version}'s common model tests could not be fetched: `pip download --no-binary :all: "
            f"transformers=={version}` failed ({str(details).strip()[-300:]})",
            allow_module_level=True,
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for module_name, mixin in ABSENT_MIXINS.items():
        parent, _ = module_name.split(".")
        sys.modules.setdefault(f"{PACKAGE}.{parent}", types.ModuleType(f"{PACKAGE}.{parent}"))
        stand_in = types.ModuleType(f"{PACKAGE}.{module_name}")
        setattr(stand_in, mixin, type(mixin, (), {}))
        sys.modules.setdefault(f"{PACKAGE}.{module_name}", stand_in)
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")


common = import_model_tester_mixin()
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor

# The Auto name mappings an in-tree CMSA would be listed in (the mixin reads them to choose inputs and checks).
AUTO_NAMES = {
    "MODEL_MAPPING_NAMES": "CMSAModel",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "CMSAForImageClassification",
}


class CMSAModelTester:
    """A tiny 3-stage CMSA: 8x8 inputs, one block per stage. Stage 1 has one attention group (its attentions are one
    tensor, the one its context is computed from: the mixin checks its shape and that it retains a gradient), stage 2
    two of different windows (a tuple of two tensors), stage 3 two of the same shape (one tensor, heads concatenated)."""

    def __init__(self, parent, batch_size=3, image_size=8, num_channels=3, num_labels=3, is_training=True):
        self.parent = parent
        self.batch_size, self.image_size, self.num_channels = batch_size, image_size, num_channels
        self.num_labels, self.is_training = num_labels, is_training
        self.depths = [1, 1, 1]
        self.num_heads = [[2], [1, 1], [1, 1]]
        self.window_splits = [[1], [1, 2], [1, 1]]
        self.kv_pool_ratios = [[2], [2, 1], [1, 1]]
        self.num_stages = len(self.depths)
        self.num_hidden_layers = sum(self.depths)  # CMSA blocks: one `attentions` entry each
        self.expected_num_hidden_layers = self.num_stages  # hidden_states: the stage outputs
        # The first block's attentions (batch, windows, heads, Nq, Nkv): its group's two heads attend over the whole
        # 8x8 map (64 queries) with keys / values pooled by 2 (16).
        self.num_attention_heads = sum(self.num_heads[0])
        self.seq_length = image_size * image_size
        self.key_length = (image_size // 2) ** 2

    def get_config(self) -> CMSAConfig:
        return CMSAConfig(
            image_size=self.image_size,
            num_channels=self.num_channels,
            hidden_sizes=[8, 16, 16],
            depths=self.depths,
            num_heads=self.num_heads,
            window_splits=self.window_splits,
            kv_pool_ratios=self.kv_pool_ratios,
            key_dim=4,
            mlp_ratio=2,
            num_labels=self.num_labels,
            keypoint_names=["nose", "left_eye", "right_eye"],
            flip_pairs=[[1, 2]],
            skeleton=[[0, 1], [0, 2]],
            head_pose_bins=6,
            head_pose_bin_width=30.0,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class CMSAModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (CMSAModel, CMSAForImageClassification, CMSAForKeypointDetection, CMSAForHeadPoseEstimation)
    test_resize_embeddings = False  # no token embeddings to resize
    test_can_init_all_missing_weights_before_2023 = True  # run it (the mixin skips files without a copyright year)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.auto_names = [
            mock.patch.dict(getattr(modeling_auto, mapping), {"cmsa": name}) for mapping, name in AUTO_NAMES.items()
        ]
        for patch in cls.auto_names:
            patch.start()
        # The mixin reads transformers' warnings (load reports); tests/conftest.py silences them for the suite.
        cls.verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_warning()
        # Runtime only: the tiny models gain nothing from intra-op threads, and on a busy machine two threads that
        # wait for each other made a forward 40x slower (1.4 s against 34 ms).
        cls.num_threads = torch.get_num_threads()
        torch.set_num_threads(1)

    @classmethod
    def tearDownClass(cls):
        torch.set_num_threads(cls.num_threads)
        transformers.logging.set_verbosity(cls.verbosity)
        for patch in cls.auto_names:
            patch.stop()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = CMSAModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            batch = self.model_tester.batch_size
            generator = torch.Generator().manual_seed(0)  # the same targets at every call
            if model_class is CMSAForKeypointDetection:
                config = self.model_tester.get_config()
                shape = (batch, config.num_keypoints, *config.stage_resolutions()[0])
                inputs_dict["target_heatmaps"] = torch.rand(shape, generator=generator)
            elif model_class is CMSAForHeadPoseEstimation:
                inputs_dict["labels"] = (torch.rand(batch, 3, generator=generator) - 0.5) * 120
        return inputs_dict

    def test_num_layers_is_small(self):
        # The fewest blocks of a 3-stage model: one per stage (see the module docstring).
        self.assertEqual(self.model_tester.depths, [1] * self.model_tester.num_stages)
        self.assertLessEqual(self.model_tester.num_hidden_layers, self.model_tester.num_stages)

    def test_hidden_states_output(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        expected = [
            [self.model_tester.batch_size, channels, *resolution]
            for channels, resolution in zip(config.hidden_sizes, config.stage_resolutions())
        ]
        for model_class in self.all_model_classes:
            for from_config in (False, True):
                run_config, inputs = copy.deepcopy(config), dict(inputs_dict)
                if from_config:
                    run_config.output_hidden_states = True
                else:
                    inputs["output_hidden_states"] = True
                model = model_class(run_config).eval()
                with torch.no_grad():
                    hidden_states = model(**self._prepare_for_class(inputs, model_class)).hidden_states
                self.assertEqual(len(hidden_states), self.model_tester.expected_num_hidden_layers)
                self.assertEqual([list(h.shape) for h in hidden_states], expected)

    def test_model_get_set_embeddings(self):
        # Pixel models: the input embeddings are the stem (no token embeddings, no output embeddings).
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config)).eval()
            stem = model.get_input_embeddings()
            self.assertIs(stem, model.base_model.stages[0].embedding)
            first_map = model.base_model(**inputs_dict, output_hidden_states=True).hidden_states[0]
            self.assertEqual(first_map.shape[1], config.hidden_sizes[0])
            replacement = nn.Conv2d(config.num_channels, config.hidden_sizes[0], 1)
            model.set_input_embeddings(replacement)
            self.assertIs(model.get_input_embeddings(), replacement)
            self.assertIsNone(model.get_output_embeddings())

    @unittest.skip(reason="Pixel models take no inputs_embeds (a text-model input)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="Pixel models take no input_ids / inputs_embeds (a text-model input)")
    def test_inputs_embeds_matches_input_ids(self):
        pass
