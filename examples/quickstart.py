"""Quick start: build CMSA-S from its preset, classify an image, reparameterize for inference, save and reload."""

import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

import cmsa_hf  # noqa: F401  (registers the CMSA classes with the Auto classes)
from cmsa_hf import CMSAConfig, CMSAForImageClassification, CMSAImageProcessor


def main():
    torch.manual_seed(0)
    config = CMSAConfig.from_variant("cmsa-s", image_size=(32, 32), id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    model = CMSAForImageClassification(config).eval()
    processor = CMSAImageProcessor.for_config(config)
    print(f"CMSA-S at 32x32: {model.num_parameters() / 1e6:.2f}M parameters (train-time form)")

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8))
    pixel_values = processor(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = model(pixel_values).logits
    print("prediction of the untrained model:", model.config.id2label[int(logits.argmax())])

    model.reparameterize()  # fold the train-time branches: fewer weights, same function, inference only
    print(f"reparameterized: {model.num_parameters() / 1e6:.2f}M parameters")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        reloaded = AutoModelForImageClassification.from_pretrained(folder)
        print("reloaded:", type(reloaded).__name__, "reparameterized =", reloaded.config.reparameterized)
        print("pipeline:", pipeline("image-classification", model=folder)(image))


if __name__ == "__main__":
    main()
