import pytest

from cmsa_hf import VARIANTS, CMSAConfig
from cmsa_hf.configuration_cmsa import (
    COCO_FLIP_PAIRS, COCO_KEYPOINT_SIGMAS, DEFAULT_KEYPOINT_SIGMA, HEAD_FIELDS, TASK_HEADS, flip_pairs_from_names,
)  # fmt: skip


def test_defaults_are_cmsa_s_at_32x24():
    config = CMSAConfig()
    assert config.model_type == "cmsa"
    assert config.image_size == [32, 24]
    assert config.hidden_sizes == VARIANTS["cmsa-s"]["hidden_sizes"]
    assert config.num_heads == VARIANTS["cmsa-s"]["num_heads"]


@pytest.mark.parametrize(
    "name, hidden_sizes, stage2_heads",
    [("cmsa-s", [96, 160, 224], [3, 3]), ("cmsa-b", [128, 192, 256], [3, 4]), ("cmsa-l", [128, 256, 320], [3, 3])],
)
def test_presets(name, hidden_sizes, stage2_heads):
    config = CMSAConfig.from_variant(name)
    assert config.hidden_sizes == hidden_sizes
    assert config.num_heads[1] == stage2_heads
    assert config.depths == [2, 4, 3]
    assert (config.key_dim, config.value_dim, config.mlp_ratio) == (16, 32, 4)


def test_windows_at_32x24_match_the_paper():
    config = CMSAConfig.from_variant("cmsa-s", image_size=(32, 24))
    assert config.stage_resolutions() == [(32, 24), (16, 12), (8, 6)]
    assert config.window_sizes(0) == [(32, 24), (16, 12), (8, 6)]
    assert config.window_sizes(1) == [(16, 12), (8, 6)]
    assert config.window_sizes(2) == [(8, 6), (8, 6)]


def test_windows_follow_the_stage_maps():
    config = CMSAConfig.from_variant("cmsa-b", image_size=(64, 48))
    assert config.window_sizes(0) == [(64, 48), (32, 24), (16, 12)]
    assert CMSAConfig.from_variant("cmsa-b", image_size=16).window_sizes(2) == [(4, 4), (4, 4)]


def test_overrides_and_case_insensitive_name():
    config = CMSAConfig.from_variant("CMSA-L", image_size=(32, 32), num_labels=100, drop_path_rate=0.0)
    assert config.hidden_sizes == [128, 256, 320]
    assert (config.num_labels, config.drop_path_rate, config.image_size) == (100, 0.0, [32, 32])


def test_unknown_variant_lists_known_ones():
    with pytest.raises(ValueError, match="cmsa-x.*cmsa-s, cmsa-b, cmsa-l"):
        CMSAConfig.from_variant("cmsa-x")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"image_size": (30, 24)}, "image_size"),  # not divisible by 4: the stage maps would not line up
        ({"image_size": (32, 20)}, r"kv_pool_ratios\[1\]\[1\]"),  # stage-2 window 8x5 cannot be pooled by 2
        ({"image_size": (32, 24), "window_splits": [[1, 2, 5], [1, 2], [1, 1]]}, r"window_splits\[0\]\[2\]"),
        ({"window_splits": [[1, 2, 3], [1, 2], [1, 1]]}, r"window_splits\[0\]\[2\]"),
        ({"kv_pool_ratios": [[2, 2, 4], [2, 2], [1, 2]]}, r"kv_pool_ratios\[0\]\[2\]"),
        ({"kv_pool_ratios": [[2, 2, 1], [2, 2], [1, 4]]}, r"kv_pool_ratios\[2\]\[1\]"),
        ({"num_heads": [[2, 2], [3, 3], [4, 4]]}, r"window_splits\[0\].*num_heads\[0\]"),
        ({"depths": [2, 4]}, "depths"),
    ],
)
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        CMSAConfig.from_variant("cmsa-s", **overrides)


def test_json_round_trip(tmp_path):
    config = CMSAConfig.from_variant("cmsa-b", image_size=(64, 48), num_labels=7)
    config.save_pretrained(tmp_path)
    loaded = CMSAConfig.from_pretrained(tmp_path)
    for field in ("image_size", "hidden_sizes", "num_heads", "window_splits", "kv_pool_ratios", "num_labels"):
        assert getattr(loaded, field) == getattr(config, field)


@pytest.mark.parametrize("image_size", [(32, 24), (64, 48), (128, 96)])
def test_fixed_window_layout_keeps_the_authors_windows_and_a_stride_1_stem(image_size):
    config = CMSAConfig.from_variant("cmsa-l", image_size=image_size, window_layout="fixed")
    assert config.stem_stride == 1 and config.stage_resolutions()[0] == image_size
    assert [config.window_sizes(stage) for stage in range(3)] == [
        [(32, 24), (16, 12), (8, 6)], [(16, 12), (8, 6)], [(8, 6), (8, 6)]
    ]  # fmt: skip
    scaled = CMSAConfig.from_variant("cmsa-l", image_size=image_size)
    same = image_size == (32, 24)
    assert (scaled.window_sizes(0) == config.window_sizes(0)) == same and (scaled.stem_stride == 1) == (image_size[0] <= 64)


def test_window_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"fixed_window_sizes\[0\]\[0\]=32x24 does not tile the stage-1 feature map 32x32"):
        CMSAConfig.from_variant("cmsa-s", image_size=(32, 32), window_layout="fixed")
    with pytest.raises(ValueError, match="window_layout must be one of"):
        CMSAConfig.from_variant("cmsa-s", window_layout="authors")
    with pytest.raises(ValueError, match=r"fixed_window_sizes\[1\] has 1 groups"):
        CMSAConfig.from_variant("cmsa-s", window_layout="fixed", fixed_window_sizes=[[(32, 24)] * 3, [(16, 12)], [(8, 6)] * 2])
    config = CMSAConfig.from_variant("cmsa-s", image_size=(64, 48), window_layout="fixed")
    assert CMSAConfig.from_dict(config.to_dict()).window_sizes(0) == config.window_sizes(0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"depths": [2, -1, 3]}, r"depths must be at least 1 everywhere, got \[2, -1, 3\]"),
        ({"depths": [2, 0, 3]}, r"depths must be at least 1 everywhere, got \[2, 0, 3\]"),
        ({"hidden_sizes": [96, 0, 224]}, r"hidden_sizes must be at least 1"),
        ({"num_heads": [[2, 0, 1], [3, 3], [4, 4]]}, r"num_heads must be at least 1"),
        ({"head_pose_bins": 0}, r"head_pose_bins must be at least 1 everywhere, got 0"),
        ({"head_pose_bin_width": 0.0}, r"head_pose_bin_width must be positive, got 0.0"),
        ({"ssr_stage_bins": [3, 0, 3]}, r"ssr_stage_bins must be at least 1"),
        ({"stem_stride": 0}, r"stem_stride must be at least 1"),
        ({"id2label": {0: "a", 1: "b", 2: "c"}, "num_labels": 2}, r"num_labels=2 disagrees with id2label, which names 3 labels"),
        ({"id2label": {0: "a", 2: "c"}}, r"id2label must have the contiguous ids 0..1, got \[0, 2\]"),
        ({"id2label": {1: "a", 2: "b"}}, r"id2label must have the contiguous ids 0..1, got \[1, 2\]"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}}, r"label2id is not the inverse of id2label"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0}}, r"label2id is not the inverse of id2label.*\('b', 1\)"),
    ],
)
def test_counts_and_label_maps_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        CMSAConfig.from_variant("cmsa-s", **overrides)


def test_a_new_label_count_for_a_saved_config_still_renames_the_labels(tmp_path):
    """transformers' fine-tuning idiom from_pretrained(folder, num_labels=N) keeps working (a new head's labels)."""
    CMSAConfig(id2label={0: "cat", 1: "dog", 2: "owl"}).save_pretrained(tmp_path)
    config = CMSAConfig.from_pretrained(tmp_path, num_labels=5)
    assert config.num_labels == 5 and config.id2label[4] == "LABEL_4"
    named = CMSAConfig(id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1}, num_labels=2)
    assert named.id2label == {0: "cat", 1: "dog"}


def test_head_fields_are_checked_against_the_one_registry():
    assert CMSAConfig().head_pose_head == next(iter(TASK_HEADS["head-pose-estimation"])) == "ssr"  # the preset first
    for task, field in HEAD_FIELDS.items():
        for name in TASK_HEADS[task]:
            assert getattr(CMSAConfig(**{field: name}), field) == name
        choices = ", ".join(repr(name) for name in TASK_HEADS[task])
        with pytest.raises(ValueError, match=f"{field} must be one of the {task} heads {choices}, got 'fsa-capsule'"):
            CMSAConfig(**{field: "fsa-capsule"})


# ---------------------------------------------------------------------------------------------- keypoint metadata

HAND_NAMES = ["wrist"] + [f"{finger}_{joint}" for finger in ("thumb", "index", "middle", "ring", "pinky") for joint in range(1, 5)]


def test_coco_keypoint_metadata_by_default():
    config = CMSAConfig()
    assert config.num_keypoints == 17 and config.keypoint_sigmas == list(COCO_KEYPOINT_SIGMAS)
    assert config.flip_pairs == [list(pair) for pair in COCO_FLIP_PAIRS] and config.upper_body_keypoints == list(range(11))
    # A config saved before the sigmas and the upper body were fields gets COCO's
    saved = {key: value for key, value in config.to_dict().items() if key not in ("keypoint_sigmas", "upper_body_keypoints")}
    assert CMSAConfig.from_dict(saved).keypoint_sigmas == config.keypoint_sigmas


def test_another_set_reads_its_flip_pairs_from_the_names_and_warns_about_sigmas():
    names = ["head", "left_hand", "right_hand", "Foot Left", "Foot Right", "left_only"]
    with pytest.warns(UserWarning, match=f"No keypoint_sigmas given for the 6 keypoints.*{DEFAULT_KEYPOINT_SIGMA}"):
        config = CMSAConfig(keypoint_names=names)
    assert config.flip_pairs == [[1, 2], [3, 4]] and config.skeleton == [] and config.upper_body_keypoints == []
    assert config.keypoint_sigmas == [DEFAULT_KEYPOINT_SIGMA] * 6
    assert flip_pairs_from_names(HAND_NAMES) == []
    hand = CMSAConfig(keypoint_names=HAND_NAMES, keypoint_sigmas=[0.02] * 21)
    assert hand.num_keypoints == 21 and CMSAConfig.from_dict(hand.to_dict()).keypoint_sigmas == [0.02] * 21


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"keypoint_sigmas": [0.05] * 16}, "keypoint_sigmas has 16 entries for 17 keypoint_names"),
        ({"keypoint_sigmas": [0.05] * 16 + [0.0]}, "keypoint_sigmas must be positive"),
        ({"flip_pairs": [[1, 2], [2, 3]]}, r"flip_pairs must be disjoint .*\[2\] appear twice"),
        ({"flip_pairs": [[4, 4]]}, r"disjoint pairs of two different keypoints; \[4\]"),
        ({"flip_pairs": [[1, 17]]}, r"flip_pairs entry \[1, 17\] must be two keypoint indices in \[0, 17\)"),
        ({"skeleton": [[0, 1, 2]]}, r"skeleton entry \[0, 1, 2\]"),
        ({"upper_body_keypoints": [0, 17]}, r"upper_body_keypoints must be distinct keypoint indices in \[0, 17\)"),
        ({"upper_body_keypoints": [3, 3]}, "upper_body_keypoints must be distinct"),
        ({"keypoint_names": ["a", "a"], "keypoint_sigmas": [0.1, 0.1]}, "each once"),
        ({"keypoint_names": ["a", "b"], "keypoint_sigmas": [0.1, 0.1], "skeleton": [[0, 2]]}, r"in \[0, 2\)"),
    ],
)
def test_keypoint_metadata_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        CMSAConfig(**overrides)


@pytest.mark.parametrize("image_size", ["32", 16.0, (32, 24.0), (32, 24, 3), True])
def test_image_size_of_another_type_is_refused(image_size):
    with pytest.raises(ValueError, match=r"image_size must be an int or a \(height, width\) pair of ints, got "):
        CMSAConfig(image_size=image_size)


def test_unknown_hidden_act_is_refused_at_construction_with_the_allowed_values():
    with pytest.raises(ValueError, match=r"hidden_act must be one of .*gelu.*relu.*swish.*, got 'swishy'"):
        CMSAConfig(hidden_act="swishy")
