"""Image processor for CMSA: whole images resized to the model's low input resolution (PIL / NumPy backend)."""

from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.processing_utils import ImagesKwargs, Unpack


class CMSAImageProcessor(PilBackend):
    r"""
    Resize to `size` (bilinear by default), rescale to [0, 1] and normalize with the ImageNet mean / std.

    Takes PIL images, NumPy arrays and torch tensors (HWC or CHW), one or a list; grayscale, RGBA (composited on
    white) and palette images are converted to RGB. Returns `pixel_values` of shape (batch, 3, height, width).
    Build one for a model with `CMSAImageProcessor.for_config(model.config)`.
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

    def __init__(self, **kwargs: Unpack[ImagesKwargs]):
        super().__init__(**kwargs)

    @classmethod
    def for_config(cls, config, **kwargs) -> "CMSAImageProcessor":
        """A processor whose output size is the model's `config.image_size`."""
        height, width = config.image_size
        return cls(size={"height": height, "width": width}, **kwargs)


__all__ = ["CMSAImageProcessor"]
