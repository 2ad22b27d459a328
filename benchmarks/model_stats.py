"""Parameter counts (train-time and reparameterized) and FLOPs of the CMSA presets, against the paper.

    python benchmarks/model_stats.py
"""

import argparse
import copy

from cmsa_hf import (
    CMSAConfig,
    CMSAForHeadPoseEstimation,
    CMSAForImageClassification,
    CMSAForKeypointDetection,
    CMSAModel,
)
from cmsa_hf.hub import count_flops

# (model class, config overrides, paper's parameter counts in millions for S / B / L, what the paper reports)
ROWS = [
    (CMSAForImageClassification, {"image_size": (32, 32), "num_labels": 100}, (4.2, 5.7, 7.4), "Table 4, CIFAR-100"),
    (CMSAModel, {"image_size": (32, 24)}, (4.0, 5.4, 7.1), "Table 3, head pose"),
    (CMSAForKeypointDetection, {"image_size": (32, 24)}, (4.1, 5.6, 7.3), "Table 2, COCO pose"),
    (CMSAForHeadPoseEstimation, {"image_size": (32, 32)}, (4.0, 5.4, 7.1), "Table 3, AFLW2000, binned head"),
]
VARIANTS = ["cmsa-s", "cmsa-b", "cmsa-l"]
POSE_SIZES = [(32, 24), (64, 48), (128, 96)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops_image_size", type=int, nargs=2, default=(32, 24))
    args = parser.parse_args()

    print("| model | input | variant | paper (M) | train-time (M) | vs paper | reparameterized (M) |")
    print("|---|---|---|---|---|---|---|")
    for model_class, overrides, paper, source in ROWS:
        for variant, paper_millions in zip(VARIANTS, paper):
            model = model_class(CMSAConfig.from_variant(variant, **overrides))
            train_time = model.num_parameters() / 1e6
            folded = copy.deepcopy(model).reparameterize().num_parameters() / 1e6
            size = "x".join(map(str, overrides["image_size"]))
            print(
                f"| {model_class.__name__} ({source}) | {size} | {variant} | {paper_millions} | {train_time:.3f} | "
                f"{100 * (train_time / paper_millions - 1):+.1f}% | {folded:.3f} |"
            )

    size = tuple(args.flops_image_size)
    print(f"\nFLOPs of CMSAModel at {size[0]}x{size[1]}, one image (FlopCounterMode; 1 MAC = 2 FLOPs)")
    print("| variant | multi-branch GFLOPs | reparameterized GFLOPs | reparameterized GMACs |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        model = CMSAModel(CMSAConfig.from_variant(variant, image_size=size)).eval()
        train_time = count_flops(model, size)
        folded = count_flops(model.reparameterize(), size)
        print(f"| {variant} | {train_time / 1e9:.3f} | {folded / 1e9:.3f} | {folded / 2e9:.3f} |")

    print("\nCMSAForKeypointDetection at the pose resolutions, reparameterized, one crop: GFLOPs (heatmap size)")
    print("| variant | " + " | ".join("x".join(map(str, size)) for size in POSE_SIZES) + " |")
    print("|---|" + "---|" * len(POSE_SIZES))
    for variant in VARIANTS:
        cells = []
        for size in POSE_SIZES:
            config = CMSAConfig.from_variant(variant, image_size=size)
            flops = count_flops(CMSAForKeypointDetection(config).eval().reparameterize(), size)
            heatmap_height, heatmap_width = config.stage_resolutions()[0]
            cells.append(f"{flops / 1e9:.3f} ({heatmap_height}x{heatmap_width})")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
