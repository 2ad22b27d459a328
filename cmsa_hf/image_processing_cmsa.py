"""Image processor for CMSA (PIL / NumPy backend): whole images resized to the model's low input resolution, or
boxes (persons, faces) cropped with an affine transform; decoding of the pose heatmaps back to image coordinates.

Crop geometry (`cmsa_hf.geometry`) uses continuous coordinates with pixel i spanning [i, i + 1], the convention of
PIL's transforms.
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
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

    def crop_matrices(self, image_sizes, boxes) -> list[list[np.ndarray]]:
        """Check the boxes of every image ((width, height) per image) and return their crop matrices.

        A box partly outside its image is cropped with black padding; a box entirely outside, of zero size, or a
        box list that does not match the images is an error.
        """
        if len(boxes) != len(image_sizes):
            raise ValueError(f"boxes has {len(boxes)} entries for {len(image_sizes)} images: give one list of boxes per image")
        matrices = []
        for index, ((width, height), image_boxes) in enumerate(zip(image_sizes, boxes)):
            per_image = []
            for box_index, box in enumerate(image_boxes):
                if len(box) != 4:
                    raise ValueError(f"image {index}, box {box_index}: expected [x, y, width, height], got {list(box)}")
                x, y, box_w, box_h = (float(v) for v in box)
                if not np.isfinite([x, y, box_w, box_h]).all():
                    raise ValueError(f"image {index}, box {box_index}: NaN or inf coordinates in {list(box)}")
                if not (box_w > 0 and box_h > 0):
                    raise ValueError(f"image {index}, box {box_index}: zero or negative size in {list(box)}")
                if x >= width or y >= height or x + box_w <= 0 or y + box_h <= 0:
                    raise ValueError(f"image {index}, box {box_index}: {list(box)} lies outside the {width}x{height} image")
                centre, size = box_to_center_and_size(box, self.size.width / self.size.height, self.box_padding)
                per_image.append(crop_matrix(centre, size, self.input_size))
            matrices.append(per_image)
        return matrices

    def normalize_crop(self, crop: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 crop -> (3, H, W) float32, rescaled and normalized."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return ((crop * np.float32(self.rescale_factor) - mean) / std).transpose(2, 0, 1).astype(np.float32)

    def preprocess(self, images, boxes=None, return_tensors=None, **kwargs) -> BatchFeature:
        """images: one image or a list. boxes (optional): per image a list of `[x, y, width, height]`; for one
        image, its list of boxes. With boxes, `pixel_values` holds one crop per box, in image order."""
        if isinstance(images, (list, tuple)):
            images = [checked_image(image, index) for index, image in enumerate(images)]
        else:
            images = checked_image(images)
        if boxes is None:
            return super().preprocess(images, return_tensors=return_tensors, **kwargs)
        if not isinstance(images, (list, tuple)):
            images, boxes = [images], [boxes]
        images = [to_rgb_image(image) for image in images]
        matrices = self.crop_matrices([image.size for image in images], boxes)
        crops = [
            self.normalize_crop(warp_image(image, matrix, self.input_size))
            for image, image_matrices in zip(images, matrices)
            for matrix in image_matrices
        ]
        pixel_values = np.stack(crops) if crops else np.zeros((0, 3, *self.input_size), np.float32)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    # -------------------------------------------------------------------------------------------- pose

    def heatmap_codec(self, heatmap_size) -> HeatmapCodec:
        """The codec between this processor's crops and heatmaps of `heatmap_size` (height, width): training
        targets and decoding share it, so they share the Gaussian sigma."""
        return HeatmapCodec(self.input_size, heatmap_size, self.heatmap_sigma, self.decoder)

    def post_process_keypoint_detection(self, outputs, boxes, image_sizes=None) -> list[list[dict]]:
        """Decode heatmaps (`outputs.heatmaps`, boxes in the order of `preprocess`) to image coordinates.

        Returns per image a list of per box dicts: `keypoints` (K, 2) (x, y), `scores` (K,) (heatmap maxima),
        `labels` (keypoint names), `bbox`. `image_sizes` ((width, height) per image) checks the boxes again.
        """
        heatmaps = outputs.heatmaps if hasattr(outputs, "heatmaps") else outputs
        if any(len(image_boxes) and np.ndim(image_boxes) != 2 for image_boxes in boxes):
            raise ValueError("boxes must hold one list of [x, y, width, height] boxes per image, e.g. [[box1, box2]]")
        total = sum(len(image_boxes) for image_boxes in boxes)
        if heatmaps.shape[0] != total:
            raise ValueError(f"{heatmaps.shape[0]} heatmaps were given for {total} boxes")
        coordinates, scores = self.heatmap_codec(heatmaps.shape[-2:]).decode(heatmaps.detach().float().cpu())
        return self.crop_keypoints_to_image(coordinates, scores, boxes, image_sizes)

    def post_process_pose_estimation(self, outputs, boxes, threshold: float | None = None) -> list[list[dict]]:
        """`post_process_keypoint_detection` in the output form of transformers' VitPose processor, so that code
        written for `VitPoseForPoseEstimation` runs on CMSA: per image, per box `keypoints` (K', 2) (x, y), `scores`
        (K',), `labels` (K',) integer keypoint ids and `bbox` (4,) as (x1, y1, x2, y2). Boxes go in as COCO
        [x, y, width, height] in image pixels (as VitPose's); `threshold` keeps keypoints scoring above it."""
        results = []
        for image_poses in self.post_process_keypoint_detection(outputs, boxes):
            per_image = []
            for pose in image_poses:
                labels = torch.arange(len(pose["scores"]))
                keep = pose["scores"] > threshold if threshold is not None else torch.ones_like(labels, dtype=torch.bool)
                x, y, width, height = (float(v) for v in pose["bbox"])
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
                    {"keypoints": torch.from_numpy(keypoints).float(), "scores": torch.as_tensor(scores[cursor]), "labels": names, "bbox": list(box)}
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
