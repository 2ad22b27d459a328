"""Image processor for CMSA (PIL / NumPy backend): whole images resized to the model's low input resolution, or
boxes (persons, faces) cropped with an affine transform; decoding of the pose heatmaps back to image coordinates.

Crop geometry (`cmsa_hf.geometry`) uses continuous coordinates with pixel i spanning [i, i + 1], the convention of
PIL's transforms.
"""

import numbers

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature, get_size_dict
from transformers.image_transforms import convert_to_rgb, to_pil_image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .codecs import DECODERS, HeatmapCodec, euler_to_rotation_matrix
from .geometry import box_to_center_and_size, crop_matrix, crop_points_to_image, warp_image


def to_rgb_image(image) -> Image.Image:
    """PIL image, (H, W, C) / (C, H, W) array or tensor -> RGB PIL image (alpha composited on white)."""
    if not isinstance(image, Image.Image):
        array = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array) if array.ndim == 2 and array.dtype == np.uint8 else to_pil_image(array)
    return Image.fromarray(convert_to_rgb(image, return_numpy=True))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def checked_image(image, index: int = 0):
    """Refuse an empty image or non-finite / out-of-range float pixels (naming image `index`), and turn the images
    whose values 8-bit processing would misread into 8-bit RGB: 16-bit PIL images (`I;16`) scaled by 255 / 65535,
    float images (PIL mode `F`, float arrays and tensors) with values in [0, 1] scaled by 255 (both rounded). Float
    images with values up to 255 stay 0..255 images, as transformers reads them; other images are returned as given.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image {index} is empty ({image.width}x{image.height} pixels)")
        if image.mode in SIXTEEN_BIT_MODES:
            return to_rgb_image(np.round(np.asarray(image, dtype=np.float64) * (255 / 65535)).astype(np.uint8))
        if image.mode != "F":
            return image
        array = np.asarray(image)
    else:
        array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) and image.is_floating_point() else image
    if not isinstance(array, np.ndarray):
        return image
    if array.size == 0:
        raise ValueError(f"image {index} is empty (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.floating):
        return image
    if not np.isfinite(array).all():
        raise ValueError(f"image {index} holds NaN or inf pixel values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"image {index} has float values from {low:g} to {high:g}: expected [0, 1] (or 0..255)")
    if high > 1 or array.ndim not in (2, 3):
        return image
    return to_rgb_image(np.round(array * 255).astype(np.uint8))


def is_number(value) -> bool:
    """A Python / NumPy number or a 0-d array / tensor."""
    return isinstance(value, numbers.Number) or getattr(value, "ndim", None) == 0


def format_box(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" if is_number(v) else repr(v) for v in box) + "]"


def boxes_of_one_image(boxes) -> list:
    """The boxes given for one image, in any of the accepted forms, as VitPose's form (one list of boxes per image,
    here one): a flat box `[x, y, width, height]`, a list (or (N, 4) array / tensor) of boxes, or that list already
    wrapped for one image (`[person_boxes]`, as transformers' VitPose docs pass it)."""
    if is_number(boxes):
        raise ValueError(f"boxes must be [x, y, width, height] boxes, got the number {boxes!r}")
    if len(boxes) == 0:
        return [boxes]
    first = boxes[0]
    if is_number(first):
        return [[boxes]]
    return [boxes] if len(first) and is_number(first[0]) else boxes


def check_box_lists(boxes, images: int | None = None):
    """Refuse `boxes` that are not one list of boxes per image (of `images` images when given)."""
    if is_number(boxes) or (len(boxes) and is_number(boxes[0])):
        raise ValueError(
            f"boxes must hold one list of [x, y, width, height] boxes per image, e.g. [[box1, box2]]; got the flat box "
            f"{format_box(boxes) if not is_number(boxes) else boxes}: for one image and one box pass [[{'x, y, width, height'}]]"
        )
    if images is not None and len(boxes) != images:
        raise ValueError(f"boxes has {len(boxes)} entries for {images} images: give one list of boxes per image")
    for index, image_boxes in enumerate(boxes):
        if is_number(image_boxes) or (len(image_boxes) and is_number(image_boxes[0])):
            raise ValueError(
                f"boxes must hold one list of [x, y, width, height] boxes per image, e.g. [[box1, box2]]; entry {index} "
                f"is one flat box {format_box(image_boxes) if not is_number(image_boxes) else image_boxes}: wrap it as [[x, y, width, height]]"
            )


class CMSAImageProcessor(PilBackend):
    r"""
    Without boxes: resize each image to `size` (bilinear by default). With boxes (COCO `[x, y, width, height]`
    per image): crop each box with an affine transform that keeps the model's aspect ratio and pads the box by
    `box_padding` (x1.25 for persons, as in the HRNet protocol). Then rescale to [0, 1] and normalize (ImageNet
    mean / std). Takes PIL images, NumPy arrays and torch tensors (HWC or CHW), one or a list; grayscale, RGBA
    (composited on white) and palette images become RGB. 16-bit (`I;16`) images and float images in [0, 1] (PIL mode
    `F`, float arrays) are first converted to 8-bit (`checked_image`); an empty image, NaN / inf pixels and a box with
    NaN / inf coordinates are errors. Returns `pixel_values` (images or boxes, 3, H, W).

    `post_process_keypoint_detection` decodes pose heatmaps (`decoder` "dark" or "quarter", Gaussian
    `heatmap_sigma` of the training targets) back to image coordinates. Build a processor for a model with
    `CMSAImageProcessor.for_config(model.config)`.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 32, "width": 24}
    default_to_square = True
    do_resize = True
    do_center_crop = False
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        box_padding: float = 1.25,
        heatmap_sigma: float | None = None,
        decoder: str = "dark",
        keypoint_names: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.box_padding, self.heatmap_sigma, self.decoder = box_padding, heatmap_sigma, decoder
        self.keypoint_names = list(keypoint_names) if keypoint_names is not None else None

    @classmethod
    def for_config(cls, config, **kwargs) -> "CMSAImageProcessor":
        """A processor whose output size is the model's `config.image_size`; pose models also pass
        `keypoint_names=config.keypoint_names`."""
        height, width = config.image_size
        return cls(size={"height": height, "width": width}, **kwargs)

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.size.height, self.size.width)

    # -------------------------------------------------------------------------------------------- box crops

    def crop_matrices(self, image_sizes, boxes, output_size=None) -> list[list[np.ndarray]]:
        """Check the boxes of every image ((width, height) per image; one list of boxes or (N, 4) array per image) and
        return their crop matrices to `output_size` (height, width; the processor's size by default).

        A box partly outside its image is cropped with black padding; a box entirely outside, of zero size, or a
        box list that does not match the images is an error.
        """
        check_box_lists(boxes, len(image_sizes))
        output_size = output_size or self.input_size
        matrices = []
        for index, ((width, height), image_boxes) in enumerate(zip(image_sizes, boxes)):
            per_image = []
            for box_index, box in enumerate(image_boxes):
                if is_number(box) or len(box) != 4:
                    raise ValueError(f"image {index}, box {box_index}: expected [x, y, width, height], got {box!r}")
                x, y, box_w, box_h = (float(v) for v in box)
                if not np.isfinite([x, y, box_w, box_h]).all():
                    raise ValueError(f"image {index}, box {box_index}: NaN or inf coordinates in {format_box(box)}")
                if not (box_w > 0 and box_h > 0):
                    raise ValueError(f"image {index}, box {box_index}: zero or negative size in {format_box(box)}")
                if x >= width or y >= height or x + box_w <= 0 or y + box_h <= 0:
                    raise ValueError(f"image {index}, box {box_index}: {format_box(box)} lies outside the {width}x{height} image")
                centre, size = box_to_center_and_size((x, y, box_w, box_h), output_size[1] / output_size[0], self.box_padding)
                per_image.append(crop_matrix(centre, size, output_size))
            matrices.append(per_image)
        return matrices

    def normalize_crop(self, crop: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 crop -> (3, H, W) float32, rescaled and normalized."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return ((crop * np.float32(self.rescale_factor) - mean) / std).transpose(2, 0, 1).astype(np.float32)

    def preprocess(
        self, images, boxes=None, do_affine_transform: bool = True, normalize_factor: float = 200.0, **kwargs
    ) -> BatchFeature:
        """images: one image or a list. boxes (optional), COCO `[x, y, width, height]` in image pixels: one list of
        boxes (or (N, 4) array / tensor) per image, as transformers' VitPose takes them; for one image also its list
        of boxes or one flat box. With boxes, `pixel_values` holds one crop per box, in image order, of `size`.

        The other arguments are transformers' image-processor ones (`size`, `do_rescale`, `rescale_factor`,
        `do_normalize`, `image_mean`, `image_std`, `return_tensors`, ...), as VitPose's processor takes them; as
        there, the crops are not resized, center-cropped or padded again. `do_affine_transform=False` processes the
        images whole, ignoring the boxes. `normalize_factor` (VitPose's unit of box scale, 200 pixels) has no CMSA
        counterpart: only its default is accepted (`box_padding` sets how much context a crop takes).
        """
        if normalize_factor != 200.0:
            raise ValueError(
                f"normalize_factor={normalize_factor}: CMSA has no equivalent of VitPose's box-scale unit; it crops each "
                f"box grown by box_padding={self.box_padding} (set box_padding to change how much context a crop takes)"
            )
        if isinstance(images, (list, tuple)):
            images = [checked_image(image, index) for index, image in enumerate(images)]
        else:
            images = checked_image(images)
        if boxes is None or not do_affine_transform:
            return super().preprocess(images, **kwargs)
        if not isinstance(images, (list, tuple)):
            images, boxes = [images], boxes_of_one_image(boxes)
        images = [to_rgb_image(image) for image in images]
        size = kwargs.pop("size", None)
        output_size = self.input_size if size is None else tuple(get_size_dict(size, default_to_square=True).values())
        matrices = self.crop_matrices([image.size for image in images], boxes, output_size)
        crops = [warp_image(image, matrix, output_size) for image, image_matrices in zip(images, matrices) for matrix in image_matrices]
        if not crops:
            return BatchFeature(
                data={"pixel_values": np.zeros((0, 3, *output_size), np.float32)}, tensor_type=kwargs.get("return_tensors")
            )
        return super().preprocess(crops, do_resize=False, do_center_crop=False, do_pad=False, **kwargs)

    # -------------------------------------------------------------------------------------------- pose

    def heatmap_codec(self, heatmap_size) -> HeatmapCodec:
        """The codec between this processor's crops and heatmaps of `heatmap_size` (height, width): training
        targets and decoding share it, so they share the Gaussian sigma."""
        return HeatmapCodec(self.input_size, heatmap_size, self.heatmap_sigma, self.decoder)

    def post_process_keypoint_detection(self, outputs, boxes, image_sizes=None, kernel_size: int | None = None) -> list[list[dict]]:
        """Decode heatmaps (`outputs.heatmaps`, boxes in the order of `preprocess`) to image coordinates.

        Returns per image a list of per box dicts: `keypoints` (K, 2) (x, y), `scores` (K,) (heatmap maxima),
        `labels` (keypoint names), `bbox`. `image_sizes` ((width, height) per image) checks the boxes again.
        `kernel_size`: the Gaussian kernel of DARK's modulation (default: the codec's, from the heatmap sigma).
        """
        heatmaps = outputs.heatmaps if hasattr(outputs, "heatmaps") else outputs
        check_box_lists(boxes)
        total = sum(len(image_boxes) for image_boxes in boxes)
        if heatmaps.shape[0] != total:
            raise ValueError(f"{heatmaps.shape[0]} heatmaps were given for {total} boxes")
        codec = self.heatmap_codec(heatmaps.shape[-2:])
        coordinates, scores = codec.decode(heatmaps.detach().float().cpu(), kernel_size=kernel_size)
        return self.crop_keypoints_to_image(coordinates, scores, boxes, image_sizes)

    def post_process_pose_estimation(
        self, outputs, boxes, kernel_size: int | None = None, threshold: float | None = None, target_sizes=None
    ) -> list[list[dict]]:
        """`post_process_keypoint_detection` with the arguments and output form of transformers' VitPose processor,
        so that code written for `VitPoseForPoseEstimation` runs on CMSA: per image, per box `keypoints` (K', 2)
        (x, y), `scores` (K',), `labels` (K',) integer keypoint ids and `bbox` (4,) as (x1, y1, x2, y2).

        boxes: COCO [x, y, width, height] per image (lists or NumPy arrays), in image pixels, or, with
        `target_sizes` ((height, width) per image, as transformers' post-processing takes them), relative to the
        image ([0, 1]) and scaled by its size. `kernel_size`: DARK's Gaussian modulation kernel (odd; default the
        codec's). `threshold` keeps the keypoints scoring above it.
        """
        check_box_lists(boxes)
        image_sizes = None
        if target_sizes is not None:
            if len(target_sizes) != len(boxes):
                raise ValueError(
                    f"target_sizes has {len(target_sizes)} entries for {len(boxes)} images: give one (height, width) per image"
                )
            image_sizes = [(float(width), float(height)) for height, width in target_sizes]
            boxes = [
                [[float(v) * scale for v, scale in zip(box, (width, height, width, height))] for box in image_boxes]
                for image_boxes, (width, height) in zip(boxes, image_sizes)
            ]
        results = []
        for image_poses in self.post_process_keypoint_detection(outputs, boxes, image_sizes, kernel_size):
            per_image = []
            for pose in image_poses:
                labels = torch.arange(len(pose["scores"]))
                keep = pose["scores"] > threshold if threshold is not None else torch.ones_like(labels, dtype=torch.bool)
                x, y, width, height = pose["bbox"]
                per_image.append(
                    {
                        "keypoints": pose["keypoints"][keep],
                        "scores": pose["scores"][keep],
                        "labels": labels[keep],
                        "bbox": torch.tensor([x, y, x + width, y + height]),
                    }
                )
            results.append(per_image)
        return results

    def crop_keypoints_to_image(self, coordinates, scores, boxes, image_sizes=None) -> list[list[dict]]:
        """Keypoints decoded in crop pixels ((total boxes, K, 2), `HeatmapCodec.decode`) -> per image, per box
        dicts in image coordinates (see `post_process_keypoint_detection`)."""
        sizes = image_sizes or [(float("inf"), float("inf"))] * len(boxes)
        names = self.keypoint_names or [str(i) for i in range(coordinates.shape[1])]
        results, cursor = [], 0
        for image_boxes, image_matrices in zip(boxes, self.crop_matrices(sizes, boxes)):
            per_image = []
            for box, matrix in zip(image_boxes, image_matrices):
                keypoints = crop_points_to_image(np.asarray(coordinates[cursor]), matrix)
                per_image.append(
                    {"keypoints": torch.from_numpy(keypoints).float(), "scores": torch.as_tensor(scores[cursor]), "labels": names, "bbox": [float(v) for v in box]}
                )
                cursor += 1
            results.append(per_image)
        return results

    # -------------------------------------------------------------------------------------------- head pose

    def post_process_head_pose(self, outputs, return_rotation_matrix: bool = False) -> list[dict]:
        """`outputs.angles` (faces, 3) -> per face `{"yaw", "pitch", "roll"}` in degrees (the 300W-LP convention of
        `cmsa_hf.codecs`), plus `rotation_matrix` (3x3 list) when asked."""
        angles = outputs.angles if hasattr(outputs, "angles") else outputs
        angles = torch.as_tensor(angles).detach().float().cpu()
        if angles.ndim != 2 or angles.shape[1] != 3:
            raise ValueError(f"expected angles of shape (faces, 3), got {tuple(angles.shape)}")
        poses = []
        for yaw, pitch, roll in angles.tolist():
            pose = {"yaw": yaw, "pitch": pitch, "roll": roll}
            if return_rotation_matrix:
                pose["rotation_matrix"] = euler_to_rotation_matrix(yaw, pitch, roll).tolist()
            poses.append(pose)
        return poses


# The same processor, under the name used for pose in the docs.
CMSAKeypointImageProcessor = CMSAImageProcessor

__all__ = ["CMSAImageProcessor", "CMSAKeypointImageProcessor"]
