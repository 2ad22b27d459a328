"""CMSA model configuration and the paper's S / B / L presets."""

import math
import numbers
import re
import warnings

from transformers import PreTrainedConfig


# Table 1 of the paper, as released in the authors' code (models/cmasformer.py) for 32x24 inputs.
# Windows are given relative to each stage's feature map (number of windows per side) so that the
# same preset runs at 16x16, 32x24, 32x32, 64x48, 64x64, ...
_COMMON = {
    "depths": [2, 4, 3],
    "window_splits": [[1, 2, 4], [1, 2], [1, 1]],
    "kv_pool_ratios": [[2, 2, 1], [2, 2], [1, 2]],
    "key_dim": 16,
    "value_ratio": 2,
    "mlp_ratio": 4,
}
VARIANTS = {
    "cmsa-s": {"hidden_sizes": [96, 160, 224], "num_heads": [[2, 2, 1], [3, 3], [4, 4]], **_COMMON},
    "cmsa-b": {"hidden_sizes": [128, 192, 256], "num_heads": [[1, 2, 1], [3, 4], [4, 5]], **_COMMON},
    "cmsa-l": {"hidden_sizes": [128, 256, 320], "num_heads": [[1, 2, 1], [3, 3], [4, 4]], **_COMMON},
}


# The inputs above which `from_variant` gives the stem stride 2 (the network then works at half the input size), in the
# "scaled" window layout only.
FULL_RESOLUTION_MAX_SIDE = 64

# How attention windows are sized: "scaled" (relative to each stage's map, `window_splits`) or "fixed" (the absolute
# `fixed_window_sizes`, by default the windows the authors' released factories hard-code for every input size).
WINDOW_LAYOUTS = ("scaled", "fixed")
AUTHORS_WINDOW_SIZES = (((32, 24), (16, 12), (8, 6)), ((16, 12), (8, 6)), ((8, 6), (8, 6)))

# The one registry of task heads: per task (the model's `pipeline_task`), head name -> its class in modeling_cmsa.py,
# the task's preset first. `CMSAConfig` validates its head fields (`HEAD_FIELDS`) against it and the models build their
# head from it (`modeling_cmsa.head_class`).
TASK_HEADS = {
    "image-classification": {"linear": "CMSAClassificationHead"},
    "keypoint-detection": {"heatmap": "CMSAHeatmapHead"},
    "head-pose-estimation": {"ssr": "CMSASoftStagewiseHead", "binned": "CMSABinnedAngleHead"},
}
# The config field that picks the head of each task with more than one.
HEAD_FIELDS = {"head-pose-estimation": "head_pose_head"}
HEAD_POSE_HEADS = tuple(TASK_HEADS["head-pose-estimation"])  # the choices of run_head_pose.py --head

# COCO person keypoints: names, left/right pairs swapped by a horizontal flip, skeleton edges (0-based), the OKS
# sigmas of COCOeval (pycocotools' `kpt_oks_sigmas`) and the upper body of HRNet's half-body augmentation.
COCO_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
COCO_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip
COCO_KEYPOINT_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip
COCO_UPPER_BODY_KEYPOINTS = tuple(range(11))  # nose, eyes, ears, shoulders, elbows, wrists
# The OKS sigma given to every keypoint of a set that names none: the mean of COCO's 17 (0.0669, between COCO's
# elbows and hips), with a warning, since OKS AP then measures a tolerance nobody calibrated for that set.
DEFAULT_KEYPOINT_SIGMA = round(sum(COCO_KEYPOINT_SIGMAS) / len(COCO_KEYPOINT_SIGMAS), 4)

_SIDE_WORDS = {"left": "right", "right": "left"}


def flip_pairs_from_names(names) -> list[list[int]]:
    """Left / right keypoint pairs read from the names: a name holding the word "left" (or "right") pairs with the
    same name holding "right" (or "left") instead, the words split by "_", "-", "." or spaces, in any case
    ("left_eye" / "right_eye", "Wrist Left" / "Wrist Right"). Names without a partner are not flipped."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        words = re.split(r"([_\-. ])", name)
        lowered = [word.lower() for word in words]
        if "left" not in lowered:
            continue
        partner = "".join(
            _match_case(_SIDE_WORDS[low], word) if low in _SIDE_WORDS else word for word, low in zip(words, lowered)
        )
        if partner in index:
            pairs.append([i, index[partner]])
    return pairs


def _match_case(word: str, like: str) -> str:
    return word.upper() if like.isupper() else word.capitalize() if like[:1].isupper() else word


def _tasks_served_remotely(custom_pipelines: dict) -> dict:
    """The saved `custom_pipelines` entries (remote pipeline code, for users without cmsa_hf) minus the tasks this
    environment already has a pipeline for: with cmsa_hf imported, `pipeline("keypoint-detection", model=folder)`
    then takes the installed implementation and asks for no `trust_remote_code`. `save_pretrained` of a model
    writes the full entry again."""
    from transformers.pipelines import PIPELINE_REGISTRY  # noqa: PLC0415

    return {task: entry for task, entry in custom_pipelines.items() if task not in PIPELINE_REGISTRY.supported_tasks}


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value, name: str = "image_size") -> tuple[int, int]:
    """An int (a square) or a (height, width) pair of ints; anything else (a string, a float) is refused."""
    if _is_integer(value):
        return (int(value), int(value))
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(map(_is_integer, value)):
        raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}")
    return tuple(int(v) for v in value)


class CMSAConfig(PreTrainedConfig):
    r"""
    Configuration of a CMSA (cascaded multi-scale attention) network, Lu, Suganuma and Okatani, "Cascaded
    Multi-Scale Attention for Enhanced Multi-Scale Feature Extraction and Interaction with Low-Resolution
    Images". The defaults build CMSA-S for 32x24 inputs; use [`CMSAConfig.from_variant`] for the presets.

    Architecture (see `modeling_cmsa.py`): a stem of two reparameterizable depthwise + pointwise embeddings,
    three stages of CMSA blocks (the first at the stem's resolution, each next one halved by a stride-2
    embedding) and a multi-stage fusion that upsamples every stage to the first stage's resolution.

    Args:
        image_size (`int` or `(height, width)`, defaults to `(32, 24)`):
            Input resolution. The attention windows and their relative-position bias tables are sized for it,
            so a model only accepts inputs of this size.
        num_channels (`int`, defaults to 3): Input channels.
        hidden_sizes (`list[int]`): Channels C_i of each stage.
        depths (`list[int]`): Number of CMSA blocks per stage.
        num_heads (`list[list[int]]`): Heads of each attention group, per stage. Group k of a stage attends
            within its own window size; groups are cascaded from the first (largest window) to the last.
        window_layout (`str`, defaults to `"scaled"`): How the attention windows are sized.
            `"scaled"`: relative to each stage's feature map (`window_splits`), so the first group of every stage
            attends over the whole map at any input size, as the paper defines it ((s_1, t_1) = (H, W), Section 3.2).
            `"fixed"`: the absolute `fixed_window_sizes` at every input size, as the authors' released factories
            (`CMSAFormer_*_32`, windows hard-coded for 32x24) compute when given larger inputs: at 64x48 the stage-1
            map is tiled by 2x2 windows of 32x24. The two layouts are identical at 32x24. The windows must tile every
            stage's map (the config raises an error naming the window otherwise): the fixed layout does not fit
            32x32 or 64x64 inputs.
        window_splits (`list[list[int]]`): Windows per side for each group, relative to the stage's feature
            map (the `"scaled"` layout): 1 is global attention over the whole map, 2 splits each side in two, and
            so on. At 32x24 the presets give windows (32, 24), (16, 12), (8, 6) in stage 1; (16, 12), (8, 6) in
            stage 2; (8, 6) twice in stage 3.
        fixed_window_sizes (`list[list[(int, int)]]`, defaults to the authors' windows above): Window (height,
            width) of every group, per stage, used by the `"fixed"` layout.
        kv_pool_ratios (`list[list[int]]`): Average-pooling ratio of the keys / values of each group (1: none).
            Must divide the group's window.
        key_dim (`int`, defaults to 16): Query / key channels per head.
        value_ratio (`int`, defaults to 2): Value channels per head as a multiple of `key_dim` (the paper's
            "doubled value channels").
        mlp_ratio (`int`, defaults to 4): Hidden width of the MLP as a multiple of the stage's channels.
        conv_kernel_size (`int`, defaults to 3): Kernel of the depthwise convolutions (stem, embeddings,
            positional encodings, spatial fusion).
        stem_stride (`int`, defaults to 1): Stride of the stem. 1 keeps stage 1 at the input resolution, as in
            the paper at 32x24; 2 runs the network at half the input resolution.
        hidden_act (`str`, defaults to `"gelu"`): Activation used throughout.
        drop_path_rate (`float`, defaults to 0.1): Stochastic depth rate of the last block; it grows linearly
            from 0 over all blocks (the released code keeps it constant per stage, which looks like a bug).
        batch_norm_eps (`float`, defaults to 1e-5): Epsilon of every BatchNorm.
        layer_norm_eps (`float`, defaults to 1e-6): Epsilon of the LayerNorm before each MLP.
        fusion_hidden_ratio (`float`, defaults to 0.5): Width of the fusion head's hidden 1x1 convolution as a
            fraction of the concatenated stage channels (sum C / 2 in the authors' code).
        classifier_dropout (`float`, defaults to 0.0): Dropout before the classification layer.
        initializer_range (`float`, defaults to 0.02): Std of the truncated normal init of linear layers, the
            attention's output projection included (an `nn.Linear` in the authors' code, a 1x1 conv here).
        keypoint_names (`list[str]`, defaults to COCO's 17): Keypoints predicted by `CMSAForKeypointDetection`,
            one heatmap each, in this order.
        flip_pairs (`list[list[int]]`, defaults to COCO's for COCO's names, else read from "left" / "right" in the
            names, `flip_pairs_from_names`): Keypoint index pairs that a horizontal flip swaps (disjoint).
        skeleton (`list[list[int]]`, defaults to COCO's for COCO's names, else none): Keypoint index pairs joined
            when drawing a pose.
        keypoint_sigmas (`list[float]`, defaults to COCO's for COCO's names, else `DEFAULT_KEYPOINT_SIGMA` for every
            keypoint, with a warning): Per-keypoint OKS sigmas (COCOeval's `kpt_oks_sigmas`, the OKS NMS).
        upper_body_keypoints (`list[int]`, defaults to COCO's nose to wrists for COCO's names, else none): The
            keypoints of the upper body for the half-body augmentation (none: no half-body crops).
        heatmap_init_scale (`float`, defaults to 0.01): Initial scale (BatchNorm weight) of the heatmaps of
            `CMSAForKeypointDetection`, so that they start near zero like the Gaussian targets' background.
        head_pose_head (`str`, defaults to `"ssr"`): Head of `CMSAForHeadPoseEstimation` (`TASK_HEADS`): `"ssr"`, the
            paper's "binned classification and soft stage-wise regression" of FSA-Net (Section 4.2.2): per stage a
            few bins, a shift and a range from the pooled stage, a few thousand weights, with which the model has
            the paper's 4.0 / 5.4 / 7.1M parameters; or `"binned"` (the Hopenet form the authors' scripts point at:
            per angle, logits over 66 bins from the pooled last stage, about 45k weights at CMSA-S, 4.1M in all).
        head_pose_bins (`int`, defaults to 66) and head_pose_bin_width (`float`, defaults to 3.0): The angle bins
            of the binned head, centred on 0 (66 x 3 degrees cover [-99, 99]).
        head_pose_regression_weight (`float`, defaults to 2.0): alpha in the binned loss CE + alpha * MSE of the
            expected angle (the authors' script used 2).
        ssr_stage_bins (`list[int]`, defaults to `[3, 3, 3]`): Bins per stage of the SSR head.
        reparameterized (`bool`, defaults to `False`): Whether the multi-branch convolutions and the conv + BN
            pairs are folded into single convolutions (inference form, see `CMSAPreTrainedModel.reparameterize`).
    """

    model_type = "cmsa"

    image_size: int | list[int] | tuple[int, int] = (32, 24)
    num_channels: int = 3
    hidden_sizes: list[int] | tuple[int, ...] = tuple(VARIANTS["cmsa-s"]["hidden_sizes"])
    depths: list[int] | tuple[int, ...] = tuple(_COMMON["depths"])
    num_heads: list | tuple = tuple(tuple(h) for h in VARIANTS["cmsa-s"]["num_heads"])
    window_layout: str = "scaled"
    window_splits: list | tuple = tuple(tuple(s) for s in _COMMON["window_splits"])
    fixed_window_sizes: list | tuple = AUTHORS_WINDOW_SIZES
    kv_pool_ratios: list | tuple = tuple(tuple(r) for r in _COMMON["kv_pool_ratios"])
    key_dim: int = 16
    value_ratio: int = 2
    mlp_ratio: int = 4
    conv_kernel_size: int = 3
    stem_stride: int = 1
    hidden_act: str = "gelu"
    drop_path_rate: float = 0.1
    batch_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-6
    fusion_hidden_ratio: float = 0.5
    classifier_dropout: float = 0.0
    initializer_range: float = 0.02
    reparameterized: bool = False
    heatmap_init_scale: float = 0.01
    head_pose_head: str = "ssr"
    head_pose_bins: int = 66
    head_pose_bin_width: float = 3.0
    head_pose_regression_weight: float = 2.0
    ssr_stage_bins: list | tuple = (3, 3, 3)
    keypoint_names: list | tuple = COCO_KEYPOINT_NAMES
    flip_pairs: list | tuple | None = None
    skeleton: list | tuple | None = None
    keypoint_sigmas: list | tuple | None = None
    upper_body_keypoints: list | tuple | None = None

    def __post_init__(self, **kwargs):
        self.image_size = list(_pair(self.image_size))
        self.hidden_sizes = [int(c) for c in self.hidden_sizes]
        self.depths = [int(d) for d in self.depths]
        self.num_heads = [[int(h) for h in stage] for stage in self.num_heads]
        self.window_splits = [[int(s) for s in stage] for stage in self.window_splits]
        self.fixed_window_sizes = [
            [list(_pair(window, "fixed_window_sizes")) for window in stage] for stage in self.fixed_window_sizes
        ]
        self.kv_pool_ratios = [[int(r) for r in stage] for stage in self.kv_pool_ratios]
        self.ssr_stage_bins = [int(b) for b in self.ssr_stage_bins]
        self._set_keypoint_metadata()
        self._validate_positive()
        self._validate_architecture()
        self._validate_keypoints()
        self._validate_heads()
        self._validate_head_pose()
        # A saved config (it carries transformers_version) loaded with a new num_labels is a new classifier head:
        # transformers then names the new labels LABEL_i, as ever. Given together in code, the two must agree.
        num_labels = kwargs.get("num_labels")
        loaded = self.transformers_version is not None
        if num_labels is not None and self.id2label is not None and num_labels != len(self.id2label) and not loaded:
            raise ValueError(
                f"num_labels={kwargs['num_labels']} disagrees with id2label, which names {len(self.id2label)} labels: "
                "give one of them (num_labels follows id2label)"
            )
        if remote_pipelines := _tasks_served_remotely(kwargs.pop("custom_pipelines", None) or {}):
            kwargs["custom_pipelines"] = remote_pipelines
        super().__post_init__(**kwargs)
        self._validate_labels()

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "CMSAConfig":
        """Build a paper preset (`"cmsa-s"`, `"cmsa-b"`, `"cmsa-l"`, Table 1), any field overridable.

        CMSA-B uses stage-2 heads [3, 4]: Table 1 prints [3, 3], but only [3, 4] (one version of the authors'
        released code) reproduces the paper's 5.6M (pose) and 5.4M (head pose) parameter counts.

        The authors released 32x24 configurations only, and the paper does not say how its 64x48 and 128x96 models
        were laid out. The presets use `window_layout="scaled"` (windows relative to the stage maps): 64x48 runs at
        full resolution with every window twice as large (heatmaps 64x48), keeping the first group global as the
        paper defines it; for inputs whose shorter side exceeds 64 pixels (such as 128x96) the stem gets stride 2
        unless `stem_stride` is given, so the network works at 64x48 internally (heatmaps 64x48) instead of running
        global attention over a 128x96 map. That stride is cmsa_hf's choice, not the paper's.
        `window_layout="fixed"` gives the authors' released layout instead: the 32x24 windows at every input size
        and a stride-1 stem (full-resolution heatmaps); it is the layout whose attention-bias tables reproduce the
        paper's parameter counts at 64x48 and 128x96 (`benchmarks/model_stats.py`), and the converter of the
        authors' checkpoints uses it.
        """
        key = name.lower()
        if key not in VARIANTS:
            raise ValueError(f"Unknown CMSA variant {name!r}; known variants: {', '.join(VARIANTS)}")
        fields = {**VARIANTS[key], **overrides}
        large_input = min(_pair(fields.get("image_size", (32, 24)))) > FULL_RESOLUTION_MAX_SIDE
        if "stem_stride" not in overrides and fields.get("window_layout", "scaled") == "scaled" and large_input:
            fields["stem_stride"] = 2
        return cls(**fields)

    @property
    def variant(self) -> str | None:
        """The paper preset this architecture is (`"cmsa-s"`, `"cmsa-b"`, `"cmsa-l"`), or None for a custom one."""
        for name, preset in VARIANTS.items():
            if all(getattr(self, key) == value for key, value in preset.items()):
                return name
        return None

    @property
    def num_stages(self) -> int:
        return len(self.hidden_sizes)

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def head_pose_max_angle(self) -> float:
        """The largest |angle| (degrees) the head-pose heads express: half the bins' span (99 for 66 x 3)."""
        return 0.5 * self.head_pose_bins * self.head_pose_bin_width

    @property
    def value_dim(self) -> int:
        """Value channels per head."""
        return self.key_dim * self.value_ratio

    def stage_resolutions(self) -> list[tuple[int, int]]:
        """Feature map (height, width) of every stage at `image_size`."""
        height, width = self.image_size
        first = self.stem_stride
        return [(height // (first * 2**i), width // (first * 2**i)) for i in range(self.num_stages)]

    def window_sizes(self, stage: int) -> list[tuple[int, int]]:
        """Query window (height, width) of every attention group of a stage (see `window_layout`)."""
        if self.window_layout == "fixed":
            return [tuple(window) for window in self.fixed_window_sizes[stage]]
        height, width = self.stage_resolutions()[stage]
        return [(height // split, width // split) for split in self.window_splits[stage]]

    def _validate_positive(self):
        """Counts and sizes must be at least 1 (a zero or negative depth would silently move blocks between stages)."""
        fields = {
            "hidden_sizes": self.hidden_sizes, "depths": self.depths, "num_heads": sum(self.num_heads, []),
            "ssr_stage_bins": self.ssr_stage_bins,
        }  # fmt: skip
        for name in ("key_dim", "value_ratio", "mlp_ratio", "conv_kernel_size", "stem_stride", "head_pose_bins"):
            fields[name] = [getattr(self, name)]
        for name, values in fields.items():
            if any(value < 1 for value in values):
                raise ValueError(f"{name} must be at least 1 everywhere, got {getattr(self, name)}")
        if not self.head_pose_bin_width > 0:
            raise ValueError(f"head_pose_bin_width must be positive, got {self.head_pose_bin_width}")

    def _validate_labels(self):
        """id2label must name the ids 0 .. num_labels - 1, and label2id (when given) be its inverse."""
        ids = sorted(self.id2label)
        if ids != list(range(len(ids))):
            raise ValueError(f"id2label must have the contiguous ids 0..{len(ids) - 1}, got {ids}")
        if self.label2id is not None:
            inverse = {name: i for i, name in self.id2label.items()}
            label2id = {name: int(i) for name, i in self.label2id.items()}
            if label2id != inverse:
                wrong = sorted(set(label2id.items()) ^ set(inverse.items()), key=str)
                raise ValueError(
                    f"label2id is not the inverse of id2label (differences: {wrong[:6]}): give id2label alone, "
                    "or label2id = {name: id for id, name in id2label.items()}"
                )

    def _validate_architecture(self):
        from transformers.activations import ACT2FN  # noqa: PLC0415 (torch: not imported with the configuration)

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act must be one of {', '.join(sorted(ACT2FN))}, got {self.hidden_act!r}")
        if self.window_layout not in WINDOW_LAYOUTS:
            raise ValueError(f"window_layout must be one of {WINDOW_LAYOUTS}, got {self.window_layout!r}")
        per_stage = ("depths", "num_heads", "window_splits", "kv_pool_ratios")
        per_stage += ("fixed_window_sizes",) if self.window_layout == "fixed" else ()
        for name in per_stage:
            if len(getattr(self, name)) != self.num_stages:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} stages but hidden_sizes has {self.num_stages}"
                )
        for stage, heads in enumerate(self.num_heads):
            for name in per_stage[2:]:
                groups = getattr(self, name)[stage]
                if len(groups) != len(heads):
                    raise ValueError(
                        f"{name}[{stage}] has {len(groups)} groups but num_heads[{stage}] has {len(heads)}"
                    )
        if min(self.image_size) < 1 or self.num_channels < 1:
            raise ValueError(f"image_size and num_channels must be positive, got {self.image_size}, {self.num_channels}")
        factor = self.stem_stride * 2 ** (self.num_stages - 1)
        if any(side % factor for side in self.image_size):
            raise ValueError(
                f"image_size {tuple(self.image_size)} must be divisible by {factor} "
                f"(stem_stride={self.stem_stride} times 2 per later stage)"
            )
        for stage, (height, width) in enumerate(self.stage_resolutions()):
            for group, split in enumerate(self.window_splits[stage]):
                if self.window_layout == "scaled" and (split < 1 or height % split or width % split):
                    raise ValueError(
                        f"window_splits[{stage}][{group}]={split} does not divide the stage-{stage + 1} feature "
                        f"map {height}x{width} at image_size {tuple(self.image_size)}"
                    )
            for group, window in enumerate(self.window_sizes(stage)):
                if self.window_layout == "fixed" and (min(window) < 1 or height % window[0] or width % window[1]):
                    raise ValueError(
                        f"fixed_window_sizes[{stage}][{group}]={window[0]}x{window[1]} does not tile the stage-"
                        f"{stage + 1} feature map {height}x{width} at image_size {tuple(self.image_size)} "
                        "(window_layout='fixed' keeps the same windows at every input size; window_layout='scaled' "
                        "sizes them relative to the map)"
                    )
                ratio = self.kv_pool_ratios[stage][group]
                if ratio < 1 or window[0] % ratio or window[1] % ratio:
                    raise ValueError(
                        f"kv_pool_ratios[{stage}][{group}]={ratio} does not divide the window {window[0]}x{window[1]} "
                        f"of group {group} in stage {stage + 1} at image_size {tuple(self.image_size)}"
                    )

    def _validate_heads(self):
        """Every head field names a head registered for its task (`TASK_HEADS`)."""
        for task, field in HEAD_FIELDS.items():
            name, choices = getattr(self, field), TASK_HEADS[task]
            if name not in choices:
                raise ValueError(
                    f"{field} must be one of the {task} heads {', '.join(map(repr, choices))}, got {name!r} "
                    "(an unknown head)"
                )

    def _validate_head_pose(self):
        if len(self.ssr_stage_bins) != self.num_stages:
            raise ValueError(f"ssr_stage_bins needs one entry per stage ({self.num_stages}), got {self.ssr_stage_bins}")

    def _set_keypoint_metadata(self):
        """Fill the keypoint fields left None (COCO's for COCO's names, see the docstring) and normalise their types."""
        self.keypoint_names = [str(name) for name in self.keypoint_names]
        coco = tuple(self.keypoint_names) == COCO_KEYPOINT_NAMES
        if self.flip_pairs is None:
            self.flip_pairs = COCO_FLIP_PAIRS if coco else flip_pairs_from_names(self.keypoint_names)
        if self.skeleton is None:
            self.skeleton = COCO_SKELETON if coco else []
        if self.upper_body_keypoints is None:
            self.upper_body_keypoints = COCO_UPPER_BODY_KEYPOINTS if coco else []
        if self.keypoint_sigmas is None and not coco:
            warnings.warn(
                f"No keypoint_sigmas given for the {len(self.keypoint_names)} keypoints {self.keypoint_names[:3]}...: "
                f"OKS (COCO AP, OKS NMS) uses {DEFAULT_KEYPOINT_SIGMA} for every keypoint; give the set's own sigmas",
                stacklevel=3,
            )
        if self.keypoint_sigmas is None:
            self.keypoint_sigmas = COCO_KEYPOINT_SIGMAS if coco else [DEFAULT_KEYPOINT_SIGMA] * len(self.keypoint_names)
        self.flip_pairs = [[int(i) for i in pair] for pair in self.flip_pairs]
        self.skeleton = [[int(i) for i in edge] for edge in self.skeleton]
        self.keypoint_sigmas = [float(sigma) for sigma in self.keypoint_sigmas]
        self.upper_body_keypoints = [int(i) for i in self.upper_body_keypoints]

    def _validate_keypoints(self):
        """Clear errors for keypoint metadata that does not fit `keypoint_names` (it would otherwise surface as a
        shape error in the metrics, or as a silently wrong flip)."""
        count = self.num_keypoints
        if count == 0 or len(set(self.keypoint_names)) != count:
            raise ValueError(f"keypoint_names must be at least one name, each once, got {self.keypoint_names}")
        for name in ("flip_pairs", "skeleton"):
            for pair in getattr(self, name):
                if len(pair) != 2 or not all(0 <= i < count for i in pair):
                    raise ValueError(f"{name} entry {pair} must be two keypoint indices in [0, {count})")
        flipped = [i for pair in self.flip_pairs for i in pair]
        if len(set(flipped)) != len(flipped):
            repeated = sorted({i for i in flipped if flipped.count(i) > 1})
            raise ValueError(f"flip_pairs must be disjoint pairs of two different keypoints; {repeated} appear twice")
        if len(self.keypoint_sigmas) != count:
            raise ValueError(
                f"keypoint_sigmas has {len(self.keypoint_sigmas)} entries for {count} keypoint_names: give one per keypoint"
            )
        if not all(math.isfinite(sigma) and sigma > 0 for sigma in self.keypoint_sigmas):
            raise ValueError(f"keypoint_sigmas must be positive and finite, got {self.keypoint_sigmas}")
        upper = self.upper_body_keypoints
        if len(set(upper)) != len(upper) or not all(0 <= i < count for i in upper):
            raise ValueError(f"upper_body_keypoints must be distinct keypoint indices in [0, {count}), got {upper}")


__all__ = [
    "CMSAConfig", "TASK_HEADS", "HEAD_FIELDS", "VARIANTS", "WINDOW_LAYOUTS", "AUTHORS_WINDOW_SIZES", "COCO_KEYPOINT_NAMES",
    "COCO_FLIP_PAIRS", "COCO_SKELETON", "COCO_KEYPOINT_SIGMAS", "COCO_UPPER_BODY_KEYPOINTS", "DEFAULT_KEYPOINT_SIGMA",
    "flip_pairs_from_names",
]  # fmt: skip
