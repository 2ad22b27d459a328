import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from cmsa_hf import CMSAConfig, CMSAImageProcessor


MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.fixture
def processor():
    return CMSAImageProcessor.for_config(CMSAConfig(image_size=(32, 24)))


def _rgb(height=40, width=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_defaults_resize_rescale_normalize(processor):
    assert processor.size.height == 32 and processor.size.width == 24
    array = _rgb()
    out = processor(Image.fromarray(array), return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 24) and out.dtype == torch.float32
    expected = np.asarray(Image.fromarray(array).resize((24, 32), Image.BILINEAR), dtype=np.float64) / 255
    expected = ((expected - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)


def test_pil_numpy_and_torch_inputs_agree(processor):
    array = _rgb()
    from_pil = processor(Image.fromarray(array), return_tensors="pt").pixel_values
    from_hwc = processor(array, return_tensors="pt").pixel_values
    from_chw_tensor = processor(torch.from_numpy(array).permute(2, 0, 1), return_tensors="pt").pixel_values
    torch.testing.assert_close(from_hwc, from_pil)
    torch.testing.assert_close(from_chw_tensor, from_pil)


def test_batches(processor):
    images = [Image.fromarray(_rgb(seed=i, height=20 + i, width=50 - i)) for i in range(3)]
    assert processor(images, return_tensors="pt").pixel_values.shape == (3, 3, 32, 24)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_non_rgb_modes_become_rgb(processor, mode):
    image = Image.fromarray(_rgb()).convert(mode)
    out = processor(image, return_tensors="pt").pixel_values
    assert out.shape == (1, 3, 32, 24)
    if mode == "L":  # gray: the three channels carry the same pixel values
        pixels = out[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)


def test_transparent_pixels_are_composited_on_white(processor):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    out = processor(Image.fromarray(rgba, "RGBA"), return_tensors="pt").pixel_values
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor((1 - MEAN) / STD, dtype=torch.float32))


def test_save_and_load(tmp_path, processor):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").exists()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is CMSAImageProcessor
    assert (loaded.size.height, loaded.size.width) == (32, 24)
    assert list(loaded.image_mean) == list(processor.image_mean)


def test_unsupported_input_is_refused(processor):
    with pytest.raises((ValueError, TypeError)):
        processor("not an image")
