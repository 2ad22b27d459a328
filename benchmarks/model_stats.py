"""Parameter counts (train-time, reparameterized, and as the paper counts them) and FLOPs of the CMSA presets.

    python benchmarks/model_stats.py

The paper's count: the authors' evaluation script (dist_eval.py) calls their `reparameterize_model` and then
ptflops, which counts the parameters with `requires_grad`. Their `ReparamBlock.reparameterize` detaches every
parameter of the block after building the folded `reparam_conv`, so the folded convolutions (stem, stage
embeddings, every block's positional encoding) drop out of the count, while the conv + BN pairs their code does not
fold (spatial / channel fusion, the BatchNorm before each attention, the fusion head) stay in it with their
BatchNorms. cmsa_hf's equivalent: every parameter of the train-time model outside its `CMSAReparamConv` modules.
(Their pose model also holds `fgmm.norm0`, 2 x C1 unused BatchNorm parameters that cmsa_hf does not have.)
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
from cmsa_hf.modeling_cmsa import CMSAReparamConv

FIXED = {"window_layout": "fixed"}
# (model class, config overrides, paper's parameter counts in millions for S / B / L (None: not reported), source)
ROWS = [
    (CMSAForImageClassification, {"image_size": (32, 32), "num_labels": 100}, (4.2, 5.7, 7.4), "Table 4, CIFAR-100"),
    (CMSAModel, {"image_size": (32, 24)}, (4.0, 5.4, 7.1), "Table 3, head-pose backbone"),
    (CMSAForKeypointDetection, {"image_size": (32, 24)}, (4.1, 5.6, 7.3), "Table 2, COCO pose"),
    (CMSAForKeypointDetection, {"image_size": (64, 48)}, (None, 5.6, 7.3), "Table 2, COCO pose"),
    (CMSAForKeypointDetection, {"image_size": (64, 48), **FIXED}, (None, 5.6, 7.3), "Table 2, COCO pose"),
    (CMSAForKeypointDetection, {"image_size": (128, 96)}, (None, 5.6, 7.3), "Table 2, COCO pose"),
    (CMSAForKeypointDetection, {"image_size": (128, 96), **FIXED}, (None, 5.6, 7.3), "Table 2, COCO pose"),
    (CMSAForHeadPoseEstimation, {"image_size": (32, 32)}, (4.0, 5.4, 7.1), "Table 3, AFLW2000, SSR head (the preset)"),
    (CMSAForHeadPoseEstimation, {"image_size": (32, 32), "head_pose_head": "binned"}, (4.0, 5.4, 7.1), "Table 3, AFLW2000, binned head"),
]
VARIANTS = ["cmsa-s", "cmsa-b", "cmsa-l"]
POSE_LAYOUTS = [((32, 24), {}), ((64, 48), {}), ((64, 48), FIXED), ((128, 96), {}), ((128, 96), FIXED)]


def paper_parameter_count(model) -> int:
    """The parameters the paper's tables count (see the module docstring): all of the train-time model's, less those
    of its reparameterizable convolutions."""
    folded_away = sum(p.numel() for m in model.modules() if isinstance(m, CMSAReparamConv) for p in m.parameters())
    return model.num_parameters() - folded_away


def layout_name(config: CMSAConfig) -> str:
    stem = f", stride-{config.stem_stride} stem" if config.stem_stride != 1 else ""
    return f"{config.window_layout} windows{stem}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops_image_size", type=int, nargs=2, default=(32, 24))
    args = parser.parse_args()

    print("| model | input | layout | variant | paper (M) | paper's count (M) | = paper | train-time (M) | reparameterized (M) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model_class, overrides, paper, source in ROWS:
        for variant, paper_millions in zip(VARIANTS, paper):
            config = CMSAConfig.from_variant(variant, **overrides)
            model = model_class(config)
            counted = paper_parameter_count(model) / 1e6
            train_time = model.num_parameters() / 1e6
            folded = copy.deepcopy(model).reparameterize().num_parameters() / 1e6
            size = "x".join(map(str, overrides["image_size"]))
            if paper_millions is None:
                reported, matches = "-", "-"
            else:
                reported, matches = paper_millions, "yes" if round(counted, 1) == paper_millions else "**no**"
            print(
                f"| {model_class.__name__} ({source}) | {size} | {layout_name(config)} | {variant} | {reported} | "
                f"{counted:.3f} | {matches} | {train_time:.3f} | {folded:.3f} |"
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
    print("| input (layout) | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for size, overrides in POSE_LAYOUTS:
        cells = []
        for variant in VARIANTS:
            config = CMSAConfig.from_variant(variant, image_size=size, **overrides)
            flops = count_flops(CMSAForKeypointDetection(config).eval().reparameterize(), size)
            heatmap_height, heatmap_width = config.stage_resolutions()[0]
            cells.append(f"{flops / 1e9:.3f} ({heatmap_height}x{heatmap_width})")
        print(f"| {size[0]}x{size[1]} ({layout_name(config)}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
