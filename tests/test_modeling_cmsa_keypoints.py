"""CMSAForKeypointDetection: paper sizes, presets at the three pose resolutions, the weighted heatmap loss, the
flip test, reparameterization and the self-describing config."""

import copy
import json

import pytest
import torch
from conftest import randomise_batch_norms, tiny_config
from transformers import AutoModelForKeypointDetection

from cmsa_hf import CMSAConfig, CMSAForKeypointDetection, HeatmapCodec
from cmsa_hf.codecs import flip_heatmaps_back
from cmsa_hf.configuration_cmsa import COCO_FLIP_PAIRS, COCO_KEYPOINT_NAMES


@pytest.mark.parametrize("name, paper_millions", [("cmsa-s", 4.1), ("cmsa-b", 5.6), ("cmsa-l", 7.3)])
def test_parameters_match_table_2(name, paper_millions):
    model = CMSAForKeypointDetection(CMSAConfig.from_variant(name, image_size=(32, 24)))
    count = model.num_parameters() / 1e6
    print(f"{name} keypoints 32x24: {count:.3f}M ({count / paper_millions - 1:+.1%} vs {paper_millions}M)")
    assert abs(count / paper_millions - 1) <= 0.03, count


@pytest.mark.parametrize("name", ["cmsa-s", "cmsa-b", "cmsa-l"])
@pytest.mark.parametrize(
    "image_size, heatmap_size", [((32, 24), (32, 24)), ((64, 48), (64, 48)), ((128, 96), (64, 48))]
)
def test_presets_run_at_the_pose_resolutions(name, image_size, heatmap_size):
    config = CMSAConfig.from_variant(name, image_size=image_size)
    assert config.stem_stride == image_size[0] // heatmap_size[0]
    model = CMSAForKeypointDetection(config).eval()
    with torch.no_grad():
        heatmaps = model(torch.randn(1, 3, *image_size)).heatmaps
    assert heatmaps.shape == (1, 17, *heatmap_size)


def test_fixed_window_layout_runs_32x24_weights_at_64x48():
    """The authors' layout: the same windows (and so the same bias tables) at every input size, tiled."""
    small = CMSAForKeypointDetection(CMSAConfig.from_variant("cmsa-s", window_layout="fixed"))
    large = CMSAForKeypointDetection(CMSAConfig.from_variant("cmsa-s", image_size=(64, 48), window_layout="fixed")).eval()
    large.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        assert large(torch.randn(1, 3, 64, 48)).heatmaps.shape == (1, 17, 64, 48)


def test_explicit_stem_stride_wins_over_the_preset_rule():
    assert CMSAConfig.from_variant("cmsa-s", image_size=(128, 96), stem_stride=1).stem_stride == 1


def test_config_describes_the_keypoints(tmp_path):
    config = tiny_config()
    assert config.keypoint_names == list(COCO_KEYPOINT_NAMES) and config.num_keypoints == 17
    assert config.flip_pairs == [list(pair) for pair in COCO_FLIP_PAIRS] and len(config.skeleton) == 19
    keypoints = {"keypoint_names": ["a", "b", "c"], "flip_pairs": [[0, 2]], "skeleton": [[0, 1]], "keypoint_sigmas": [0.03, 0.05, 0.07]}
    CMSAForKeypointDetection(tiny_config(**keypoints)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {key: saved[key] for key in keypoints} == keypoints and saved["upper_body_keypoints"] == []
    loaded = AutoModelForKeypointDetection.from_pretrained(tmp_path)
    assert isinstance(loaded, CMSAForKeypointDetection) and loaded.config.num_keypoints == 3
    assert loaded(torch.randn(1, 3, 16, 16)).heatmaps.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("field, value", [("flip_pairs", [[0, 17]]), ("skeleton", [[1, 2, 3]])])
def test_bad_keypoint_indices_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_loss_is_half_the_weighted_mse():
    torch.manual_seed(0)
    model = CMSAForKeypointDetection(tiny_config())
    pixels = torch.randn(2, 3, 16, 16)
    targets = torch.rand(2, 17, 16, 16)
    weights = torch.ones(2, 17)
    weights[1, 5:] = 0
    out = model(pixels, target_heatmaps=targets, target_weights=weights)
    expected = 0.5 * (((out.heatmaps - targets) ** 2) * weights[..., None, None]).mean()
    torch.testing.assert_close(out.loss, expected)
    # a keypoint with weight 0 does not move the loss, whatever its target
    moved = targets.clone()
    moved[1, 5:] += 10
    torch.testing.assert_close(model(pixels, target_heatmaps=moved, target_weights=weights).loss, out.loss)
    out.loss.backward()
    loss, heatmaps = model(pixels, target_heatmaps=targets, return_dict=False)[:2]
    assert heatmaps.shape == (2, 17, 16, 16) and loss.ndim == 0


def test_loss_shape_errors_name_the_argument():
    model = CMSAForKeypointDetection(tiny_config())
    pixels = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="target_heatmaps must have"):
        model(pixels, target_heatmaps=torch.zeros(2, 17, 8, 8))
    with pytest.raises(ValueError, match="target_weights must have shape"):
        model(pixels, target_heatmaps=torch.zeros(2, 17, 16, 16), target_weights=torch.ones(2, 16))


@pytest.fixture(scope="module")
def pose_model():
    torch.manual_seed(0)
    return randomise_batch_norms(CMSAForKeypointDetection(tiny_config()), seed=1).double().eval()


def test_flip_test_prediction_is_mirror_equivariant(pose_model):
    """With the flip test on, predicting a mirrored crop and flipping the heatmaps back gives the prediction on
    the crop itself (any input)."""
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        direct = pose_model(pixels, flip_test=True).heatmaps
        mirrored = pose_model(pixels.flip(-1), flip_test=True).heatmaps
    torch.testing.assert_close(flip_heatmaps_back(mirrored, COCO_FLIP_PAIRS), direct, rtol=1e-9, atol=1e-9)


def test_symmetric_input_gives_mirrored_left_and_right_keypoints(pose_model):
    half = torch.randn(1, 3, 16, 8, dtype=torch.float64)
    pixels = torch.cat([half, half.flip(-1)], dim=-1)  # exactly mirror-symmetric
    with torch.no_grad():
        heatmaps = pose_model(pixels, flip_test=True).heatmaps
    torch.testing.assert_close(flip_heatmaps_back(heatmaps, COCO_FLIP_PAIRS), heatmaps, rtol=1e-9, atol=1e-9)
    keypoints, _ = HeatmapCodec((16, 16), (16, 16)).decode(heatmaps)
    for left, right in COCO_FLIP_PAIRS:
        torch.testing.assert_close(keypoints[0, left, 0], 16 - keypoints[0, right, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(keypoints[0, left, 1], keypoints[0, right, 1], atol=1e-4, rtol=0)


def test_reparameterized_pose_model_matches(pose_model):
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    folded = copy.deepcopy(pose_model).reparameterize()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(pixels).heatmaps, pose_model(pixels).heatmaps, rtol=1e-9, atol=1e-9)


def test_heatmaps_start_near_zero():
    """The head's last BN starts at heatmap_init_scale, so a new model's loss is that of an all-zero prediction."""
    torch.manual_seed(0)
    model = CMSAForKeypointDetection(tiny_config()).train()
    assert torch.all(model.head.heatmaps.bn.weight == 0.01)
    assert torch.all(model.head.neck.projection.bn.weight == 1.0)
    keypoints = torch.rand(4, 17, 2).numpy() * 12 + 2
    targets, weights = HeatmapCodec((16, 16), (16, 16)).encode(keypoints, torch.ones(4, 17).numpy())
    loss = model(torch.randn(4, 3, 16, 16), target_heatmaps=torch.from_numpy(targets), target_weights=torch.from_numpy(weights)).loss
    zero_prediction = 0.5 * (targets**2).mean()
    assert abs(loss.item() / zero_prediction - 1) < 0.1


def test_bad_targets_name_the_argument():
    model = CMSAForKeypointDetection(tiny_config())
    pixels, targets = torch.randn(2, 3, 16, 16), torch.zeros(2, 17, 16, 16)
    with pytest.raises(ValueError, match="target_weights was given without target_heatmaps"):
        model(pixels, target_weights=torch.ones(2, 17))
    spoilt = targets.clone()
    spoilt[1, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"target_heatmaps holds NaN or inf values \(samples \[1\] of the batch\)"):
        model(pixels, target_heatmaps=spoilt)
    weights = torch.ones(2, 17)
    weights[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"target_weights holds NaN or inf values \(samples \[0\]"):
        model(pixels, target_heatmaps=targets, target_weights=weights)
    with pytest.raises(TypeError, match="target_heatmaps must be a torch.Tensor, got a ndarray"):
        model(pixels, target_heatmaps=targets.numpy())
