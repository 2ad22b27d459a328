#!/usr/bin/env python
"""Reload a Hub-ready classifier folder the way its users will, and check it on held-out data.

Loads the folder with `AutoModelForImageClassification` / `AutoImageProcessor` and with
`pipeline("image-classification")`, measures accuracy on the evaluation split, prints a few predictions, and, when
the folder has a `reparameterized/` copy, checks that the folded model gives the same predictions.

    python examples/image-classification/predict.py outputs/digits-cmsa-s --dataset_name digits
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

import cmsa_hf  # noqa: F401  (registers CMSA with the Auto classes)
from cmsa_hf.data.digits import load_digits_dataset
from cmsa_hf.hub import REPARAMETERIZED_SUBFOLDER
from cmsa_hf.metrics import top_k_accuracy


@torch.no_grad()
def logits_for(folder, images, batch_size=256):
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return torch.cat([model(**processor(chunk, return_tensors="pt")).logits for chunk in chunks]), model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dataset_name", default="digits", choices=["digits"], help="Held-out data to check on.")
    parser.add_argument("--seed", type=int, default=0, help="The seed the training run split the data with.")
    parser.add_argument("--num_examples", type=int, default=5)
    args = parser.parse_args()

    held_out = load_digits_dataset(seed=args.seed)["validation"]
    images, labels = list(held_out["image"]), torch.tensor(held_out["label"])
    logits, model = logits_for(args.folder, images)
    accuracy = top_k_accuracy(logits, labels)
    measured = json.loads((args.folder / "all_results.json").read_text())
    print(f"Reloaded {type(model).__name__} ({model.num_parameters() / 1e6:.2f}M parameters) from {args.folder}")
    print(f"Held-out accuracy of the reloaded model: {accuracy:.4f} on {len(labels)} images "
          f"(training run measured {measured['eval_accuracy']}, {measured['train_runtime']} s of training)")

    classifier = pipeline("image-classification", model=str(args.folder))
    names = model.config.id2label
    for image, label in zip(images[: args.num_examples], labels[: args.num_examples].tolist()):
        top = classifier(image, top_k=1)[0]
        print(f"  pipeline: true {names[label]!r:>4} -> predicted {top['label']!r:>4} (score {top['score']:.3f})")

    folded_folder = args.folder / REPARAMETERIZED_SUBFOLDER
    if folded_folder.is_dir():
        folded_logits, folded = logits_for(folded_folder, images)
        print(f"Reparameterized copy ({folded.num_parameters() / 1e6:.2f}M parameters): accuracy "
              f"{top_k_accuracy(folded_logits, labels):.4f}, max |logit difference| "
              f"{(folded_logits - logits).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
