"""The converter of the authors' checkpoints, checked against heatmaps their code computed (../shared fixture), and
its errors on checkpoints that are not CMSA or not of the requested variant (fake state dicts, no fixture needed)."""

import copy
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from cmsa_hf.convert_cmsa_original_to_hf import (
    ConversionError,
    convert,
    load_original_state_dict,
    module_pairs,
    original_bias_columns,
    original_config,
)
from cmsa_hf.modeling_cmsa import CMSAReparamConv
from cmsa_hf.cli import main


FIXTURE = SHARED_DATA / "authors-checkpoint"
CHECKPOINT = FIXTURE / "cmsa_s_32x24_random_init.pth"
needs_fixture = pytest.mark.skipif(not CHECKPOINT.is_file(), reason=f"{FIXTURE} (../shared) is absent")


@pytest.fixture(scope="module")
def original():
    """(the authors' tensors, their pixel_values, their heatmaps)."""
    expected = load_file(FIXTURE / "cmsa_s_32x24_expected_outputs.safetensors")
    return load_original_state_dict(CHECKPOINT), expected["pixel_values"], expected["heatmaps"]


def relative_difference(model, pixel_values, heatmaps) -> float:
    with torch.no_grad():
        ours = model(pixel_values).heatmaps
    return ((ours - heatmaps).abs().max() / heatmaps.abs().max()).item()


@needs_fixture
def test_converted_checkpoint_reproduces_the_authors_heatmaps(original):
    state, pixel_values, heatmaps = original
    model = convert(state, "cmsa-s").double()
    assert not model.config.reparameterized
    multi_branch = relative_difference(model, pixel_values, heatmaps)
    folded = relative_difference(model.reparameterize(), pixel_values, heatmaps)
    print(f"max |diff| / max |heatmaps|: multi-branch {multi_branch:.3e}, reparameterized {folded:.3e}")
    assert multi_branch <= 1e-8 and folded <= 1e-8


@needs_fixture
def test_variant_is_detected_and_ddp_prefix_stripped(original, tmp_path):
    state, pixel_values, heatmaps = original
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, path)
    model = convert(load_original_state_dict(path)).double()
    assert model.config.variant == "cmsa-s"
    assert relative_difference(model, pixel_values, heatmaps) <= 1e-8


@needs_fixture
def test_authors_folded_checkpoint_converts(original):
    """Their `reparameterize_model` replaces every ReparamBlock's branches by `reparam_conv` (weight, bias) and leaves
    the rest (Conv2d_BN, norm1, fgmm) as it is: build that layout from the fixture and convert it. Folded in float64:
    the fixture's random weights and perturbed BatchNorms amplify float32 rounding (a float32 fold moves its heatmaps
    by ~0.2 relative, in their code as in ours)."""
    state, pixel_values, heatmaps = original
    multi_branch = convert(state, "cmsa-s").double()
    modules = dict(multi_branch.named_modules())
    folded_state = dict(state)
    for theirs, ours, kind in module_pairs(multi_branch.config):
        if kind != "reparam":
            continue
        conv = copy.deepcopy(modules[ours])
        conv.reparameterize()
        for prefix in (theirs, theirs.replace("embedding_blocks.0.", "stem.")):
            folded_state = {k: v for k, v in folded_state.items() if not k.startswith(f"{prefix}.rbr_")}
            folded_state[f"{prefix}.reparam_conv.weight"] = conv.reparam_conv.weight.detach()
            folded_state[f"{prefix}.reparam_conv.bias"] = conv.reparam_conv.bias.detach()
    assert not any(".rbr_" in key for key in folded_state)
    model = convert(folded_state, "cmsa-s")
    assert model.config.reparameterized
    assert not any(isinstance(m, CMSAReparamConv) and hasattr(m, "conv") for m in model.modules())
    assert relative_difference(model.double(), pixel_values, heatmaps) <= 1e-8


@needs_fixture
def test_missing_and_unexpected_tensors_are_named(original):
    state, _, _ = original
    missing = {k: v for k, v in state.items() if k != "stage_blocks.2.trains_block2.mlp.fc2.bias"}
    with pytest.raises(ConversionError, match=r"missing tensor stage_blocks\.2\.trains_block2\.mlp\.fc2\.bias"):
        convert(missing, "cmsa-s")
    extra = {**state, "stage_blocks.0.trains_block0.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"unexpected tensor stage_blocks\.0\.trains_block0\.attn\.extra\.weight"):
        convert(extra, "cmsa-s")


@needs_fixture
def test_fixture_as_another_variant_names_the_right_one(original):
    state, _, _ = original
    with pytest.raises(ConversionError, match=r"not a cmsa-l checkpoint: tensor embedding_blocks\.0\..*pass --variant cmsa-s"):
        convert(state, "cmsa-l")


@needs_fixture
def test_cli_convert_output_loads_in_the_pipeline(original, tmp_path, capsys):
    state, pixel_values, heatmaps = original
    with (
        mock.patch("huggingface_hub.HfApi.create_repo", return_value="https://huggingface.co/me/cmsa-s") as create_repo,
        mock.patch("huggingface_hub.HfApi.upload_folder") as upload_folder,
    ):
        main([
            "convert", str(CHECKPOINT), "--variant", "cmsa-s", "--image-size", "32", "24", "--output-dir", str(tmp_path),
            "--push-to-hub", "me/cmsa-s",
        ])  # fmt: skip
    assert "Converted" in capsys.readouterr().out
    create_repo.assert_called_once()
    assert upload_folder.call_args.kwargs["repo_id"] == "me/cmsa-s"
    assert upload_folder.call_args.kwargs["folder_path"] == str(tmp_path)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md"):
        assert (tmp_path / name).is_file()
    card = (tmp_path / "README.md").read_text()
    assert "cmsa_s_32x24_random_init.pth" in card and "github.com/xyongLu/CMSA" in card and "sha256" in card
    pose = pipeline("keypoint-detection", model=str(tmp_path))
    assert pose.model.config.window_layout == "fixed" and pose.model.config.variant == "cmsa-s"
    assert relative_difference(copy.deepcopy(pose.model).double(), pixel_values, heatmaps) <= 1e-8
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8))
    people = pose(image, boxes=[[4, 4, 30, 50]])
    assert len(people) == 1 and len(people[0]["keypoints"]) == 17


def fake_original_state(variant: str) -> dict[str, torch.Tensor]:
    """The first tensors of an authors' checkpoint of `variant` (the stem, then stage 1's first block)."""
    config = original_config(variant)
    width = config.hidden_sizes[0]
    state = {
        "embedding_blocks.0.embedding1.rep_dwconv.rbr_conv.0.conv.weight": torch.zeros(3, 1, 3, 3),
        "embedding_blocks.0.embedding1.rep_pwconv.rbr_conv.0.conv.weight": torch.zeros(width // 2, 3, 1, 1),
        "stage_blocks.0.trains_block0.norm2.weight": torch.zeros(width),
    }
    for group, heads in enumerate(config.num_heads[0]):
        window = config.window_sizes(0)[group]
        state[f"stage_blocks.0.trains_block0.attn.attn_modules.{group}.attention_biases"] = torch.zeros(heads, window[0] * window[1])
    return state


def test_wrong_variant_is_a_clear_error():
    with pytest.raises(ConversionError, match=r"not a cmsa-s checkpoint: tensor embedding_blocks\.0\.embedding1\.rep_pwconv\.rbr_conv\.0\.conv\.weight has shape \(64, 3, 1, 1\) where cmsa-s at 32x24 needs \(48, 3, 1, 1\)"):
        convert(fake_original_state("cmsa-b"), "cmsa-s")
    with pytest.raises(ConversionError, match=r"matches no CMSA variant:\n  cmsa-s: tensor .*\n  cmsa-b: missing tensor "):
        convert(fake_original_state("cmsa-b"))  # the right shapes but incomplete: the first missing tensor is named


def test_non_cmsa_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}}, path)
    with pytest.raises(ConversionError, match=r"unexpected tensor conv1\.weight: not a tensor of the authors' CMSAFormer"):
        convert(load_original_state_dict(path), "cmsa-s")
    with pytest.raises(ConversionError, match=r"cmsa-l: unexpected tensor conv1\.weight"):
        convert(load_original_state_dict(path))
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConversionError, match="holds no state dict"):
        load_original_state_dict(path)


def test_bias_columns_follow_the_authors_first_appearance_order():
    # A 4x2 query window over keys / values pooled to 2x1. Scanning queries, then keys, the offsets (|dy|, |dx|) first
    # appear as (0,0) (1,0) (0,1) (1,1) (2,0) (2,1) (3,0) (3,1); ours are numbered |dy| * 2 + |dx|: (0,0) (0,1) (1,0)
    # (1,1) (2,0) ... so our columns 1 and 2 are their columns 2 and 1.
    assert original_bias_columns((4, 2), (2, 1)).tolist() == [0, 2, 1, 3, 4, 5, 6, 7]
    # Without pooling the two numberings agree.
    assert original_bias_columns((2, 3), (2, 3)).tolist() == list(range(6))
