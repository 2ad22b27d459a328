#!/usr/bin/env python
"""Train (or fine-tune) a CMSA top-down human pose model with Accelerate, evaluate it with COCO OKS AP
(pycocotools) and write a Hub-ready folder.

Data: a COCO person-keypoints json and its image folder for training and for evaluation (the evaluation set
defaults to the training set: say so when you report it). Evaluation uses the ground-truth boxes, or a detection
results json (--detections_file, the detected-box protocol with OKS NMS). Defaults follow the paper's recipe
(AdamW 2.5e-3, weight decay 0.05, 5 warm-up epochs, 210 epochs, batch 32, 32x24 crops).

    accelerate launch examples/keypoint-detection/run_keypoints.py \
        --train_annotation_file coco/annotations/person_keypoints_train2017.json --train_image_dir coco/train2017 \
        --validation_annotation_file coco/annotations/person_keypoints_val2017.json \
        --validation_image_dir coco/val2017 --variant cmsa-s --image_size 32 24 --output_dir outputs/coco-cmsa-s
"""

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from cmsa_hf import CMSAForKeypointDetection, CMSAImageProcessor
from cmsa_hf.codecs import DECODERS
from cmsa_hf.data.coco import keypoint_metadata, load_coco_keypoints
from cmsa_hf.data.transforms import TopDownTransform
from cmsa_hf.hub import keypoint_detection_card
from cmsa_hf.metrics import COCO_SIGMAS, coco_keypoint_ap, coco_keypoint_results, oks_nms, pck
from cmsa_hf.training import (
    add_common_arguments,
    load_or_create_model,
    make_accelerator,
    make_train_dataloader,
    memory_format,
    prepare_output_dir,
    prepare_training,
    recipe_hyperparameters,
    finish_run,
    train_loop,
    training_summary,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (COCO person keypoints)")
    data.add_argument("--train_annotation_file", type=str, required=True)
    data.add_argument("--train_image_dir", type=str, required=True)
    data.add_argument("--validation_annotation_file", type=str, default=None, help="Default: the training set.")
    data.add_argument("--validation_image_dir", type=str, default=None)
    data.add_argument("--detections_file", type=str, default=None, help="Person detections for evaluation.")
    data.add_argument("--min_detection_score", type=float, default=0.0)
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument("--dataset_name", type=str, default="coco", help="Data set name for the model card.")
    data.add_argument("--eval_before_training", action="store_true", help="Also evaluate the initial model.")
    data.add_argument("--eval_every_epoch", action="store_true")
    data.add_argument(
        "--keypoint_metadata_file", type=str, default=None,
        help="A JSON object of config keypoint fields (keypoint_sigmas, flip_pairs, upper_body_keypoints, ...) over "
        "those of the training file's category (from scratch) or of the saved model.",
    )  # fmt: skip

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", type=str, default=None, help="A saved CMSA folder or Hub id.")
    model.add_argument("--variant", type=str, default="cmsa-s", help="Preset when training from scratch.")
    model.add_argument("--image_size", type=int, nargs=2, default=(32, 24), metavar=("HEIGHT", "WIDTH"))
    model.add_argument("--attn_implementation", choices=["sdpa", "eager"], default=None)
    model.add_argument("--heatmap_sigma", type=float, default=None, help="Default: 1 per 24 heatmap columns.")
    model.add_argument("--decoder", choices=DECODERS, default="dark")
    model.add_argument("--flip_test", action=argparse.BooleanOptionalAction, default=True, help="At evaluation.")

    augment = parser.add_argument_group("augmentation (HRNet protocol defaults)")
    augment.add_argument("--box_padding", type=float, default=1.25)
    augment.add_argument("--flip_probability", type=float, default=0.5)
    augment.add_argument("--half_body_probability", type=float, default=0.3)
    augment.add_argument("--scale_factor", type=float, default=0.35)
    augment.add_argument("--rotation_factor", type=float, default=45.0)
    augment.add_argument("--rotation_probability", type=float, default=0.6)
    augment.add_argument("--random_erasing_probability", type=float, default=0.0)

    add_common_arguments(
        parser, per_device_train_batch_size=32, per_device_eval_batch_size=128, num_train_epochs=210, drop_path_rate=0.1
    )
    return parser.parse_args(argv)


def load_model(args):
    # The keypoint set (names, skeleton, flip pairs, sigmas, upper body): from scratch the training file's, else the
    # saved model's; --keypoint_metadata_file on top.
    from_file = None if args.model_name_or_path else args.train_annotation_file
    keypoints = keypoint_metadata(from_file, args.keypoint_metadata_file)
    model = load_or_create_model(CMSAForKeypointDetection, args, **keypoints)
    processor = CMSAImageProcessor.for_config(
        model.config, box_padding=args.box_padding, heatmap_sigma=args.heatmap_sigma, decoder=args.decoder,
        keypoint_names=model.config.keypoint_names,
    )  # fmt: skip
    return model, processor


def load_split(annotation_file, image_dir, max_samples, detections_file=None, min_detection_score=0.0):
    """The person rows of a COCO split with a `sample_index` column; `max_samples` keeps whole images (their first
    ones, up to that many persons), so that a subset is scored fairly against the images it covers."""
    dataset = load_coco_keypoints(annotation_file, image_dir, detections_file, min_detection_score=min_detection_score)
    if max_samples is not None:
        counts = Counter(dataset["image_id"])
        kept, total = set(), 0
        for image_id in dict.fromkeys(dataset["image_id"]):
            if kept and total + counts[image_id] > max_samples:
                break
            kept.add(image_id)
            total += counts[image_id]
        dataset = dataset.select([i for i, image_id in enumerate(dataset["image_id"]) if image_id in kept])
    return dataset.add_column("sample_index", list(range(len(dataset))))


@torch.no_grad()
def evaluate(accelerator, model, dataloader, dataset, processor, codec, args, results_file) -> dict:
    """COCO OKS AP / AR (pycocotools, on the main process) of the whole split, each person counted once across
    processes; with ground-truth boxes also PCK@0.05 and the heatmap loss."""
    network = accelerator.unwrap_model(model).eval()
    keypoints, scores, indices, losses = [], [], [], []
    for batch in dataloader:
        pixel_values = batch["pixel_values"].contiguous(memory_format=memory_format(args))
        heatmaps = network(pixel_values=pixel_values, flip_test=args.flip_test).heatmaps
        loss = network.head.loss(heatmaps, batch["target_heatmaps"], batch["target_weights"], reduction="none")
        coordinates, confidence = codec.decode(heatmaps)
        gathered = accelerator.gather_for_metrics((coordinates, confidence, batch["sample_index"], loss))
        for store, values in zip((keypoints, scores, indices, losses), gathered):
            store.append(values.cpu())
    metrics = [None]
    if accelerator.is_main_process:
        keypoints, scores, indices, losses = (torch.cat(values) for values in (keypoints, scores, indices, losses))
        rows, sigmas = dataset.select(indices.tolist()), network.config.keypoint_sigmas
        metrics[0] = score_poses(rows, keypoints, scores, losses, processor, args, results_file, sigmas)
    return broadcast_object_list(metrics)[0]


def score_poses(rows, keypoints, scores, losses, processor, args, results_file, sigmas) -> dict:
    """Map the decoded crops back to the images, write the COCO results json (OKS NMS per image for detected
    boxes) and score it with COCOeval over every image of the split (all images of the annotation file, or those
    of the `--max_eval_samples` subset); OKS uses the keypoint set's `sigmas`."""
    boxes = [[box] for box in rows["box"]]
    poses = [image_poses[0] for image_poses in processor.crop_keypoints_to_image(keypoints, scores, boxes)]
    image_keypoints = np.stack([pose["keypoints"].numpy() for pose in poses])
    image_ids = np.asarray(rows["image_id"])
    results = coco_keypoint_results(image_ids, image_keypoints, scores.numpy(), np.asarray(rows["score"]))
    if args.detections_file:  # the detected-box protocol: OKS NMS among the rescored poses of each image
        areas = np.asarray([w * h for _, _, w, h in rows["box"]])
        keep = nms_per_image(image_ids, image_keypoints, np.asarray([r["score"] for r in results]), areas, sigmas)
        results = [results[i] for i in keep]
    annotation_file = args.validation_annotation_file or args.train_annotation_file
    evaluated_images = sorted(set(rows["image_id"])) if args.max_eval_samples is not None else None
    coco = coco_keypoint_ap(annotation_file, results, results_file, image_ids=evaluated_images, sigmas=sigmas)
    metrics = {f"eval_{name}": round(value, 4) for name, value in coco.items()}
    metrics["eval_samples"] = int(len(rows))
    if not args.detections_file:
        truth = np.stack([np.asarray(points) for points in rows["keypoints"]])
        visibility = np.stack([np.asarray(v) for v in rows["visibility"]])
        diagonal = np.asarray([math.hypot(w, h) for _, _, w, h in rows["box"]])
        metrics["eval_pck"] = round(pck(image_keypoints, truth, visibility, diagonal, 0.05), 4)
        metrics["eval_loss"] = round(losses.mean().item(), 6)
    return metrics


def nms_per_image(image_ids, keypoints, scores, areas, sigmas=COCO_SIGMAS) -> np.ndarray:
    """Indices of the poses that survive OKS NMS within their own image."""
    kept = []
    for image_id in np.unique(image_ids):
        members = np.flatnonzero(image_ids == image_id)
        kept.extend(members[oks_nms(keypoints[members], scores[members], areas[members], sigmas=sigmas)])
    return np.sort(np.asarray(kept, dtype=np.int64))


def main(argv=None):
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    prepare_output_dir(accelerator, args)
    output_dir = Path(args.output_dir)

    model, processor = load_model(args)
    model.to(memory_format=memory_format(args))
    codec = processor.heatmap_codec(model.config.stage_resolutions()[0])
    with accelerator.main_process_first():
        train_set = load_split(args.train_annotation_file, args.train_image_dir, args.max_train_samples)
        eval_set = load_split(
            args.validation_annotation_file or args.train_annotation_file,
            args.validation_image_dir or args.train_image_dir,
            args.max_eval_samples,
            args.detections_file,
            args.min_detection_score,
        )

    train_transform = TopDownTransform(
        processor, codec, model.config.flip_pairs, train=True, seed=args.seed,
        flip_probability=args.flip_probability, half_body_probability=args.half_body_probability,
        scale_factor=args.scale_factor, rotation_factor=args.rotation_factor,
        rotation_probability=args.rotation_probability, random_erasing_probability=args.random_erasing_probability,
        upper_body=model.config.upper_body_keypoints,
    )  # fmt: skip
    eval_transform = TopDownTransform(processor, codec, model.config.flip_pairs)
    train_dataloader = make_train_dataloader(train_set.with_transform(train_transform), args)
    eval_dataloader = DataLoader(
        eval_set.with_transform(eval_transform), batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler, total_steps = prepare_training(
        accelerator, args, model, train_dataloader, eval_dataloader, unit="person instances"
    )

    def run_evaluation(name: str) -> dict:
        return evaluate(accelerator, model, eval_dataloader, eval_set, processor, codec, args, output_dir / f"{name}_keypoint_results.json")

    initial = {}
    if args.eval_before_training:
        initial = {f"initial_{key}": value for key, value in run_evaluation("initial").items() if key != "eval_samples"}
        accelerator.print(f"initial evaluation: {initial}")

    def compute_loss(model, batch):
        pixel_values = batch["pixel_values"].contiguous(memory_format=memory_format(args))
        return model(pixel_values=pixel_values, target_heatmaps=batch["target_heatmaps"], target_weights=batch["target_weights"]).loss

    def on_epoch_start(epoch):
        train_transform.epoch = epoch

    def on_epoch_end(epoch):
        return run_evaluation(f"epoch_{epoch}") if args.eval_every_epoch else {}

    stats = train_loop(
        accelerator, args, model, optimizer, scheduler, train_dataloader, total_steps, compute_loss,
        on_epoch_start, on_epoch_end,
    )  # fmt: skip
    started = time.perf_counter()
    results = run_evaluation("eval")
    results.update(initial, **training_summary(stats, len(train_set), started))
    finish_run(
        accelerator, args, model, processor, results, keypoint_detection_card,
        dataset_name=args.dataset_name,
        dataset_description=f"COCO person keypoints from `{Path(args.train_annotation_file).name}`",
        eval_description=_describe_evaluation(args),
        eval_split="validation" if args.validation_annotation_file else "train",
        box_padding=args.box_padding,
        hyperparameters=_hyperparameters(args, accelerator, total_steps),
    )
    return results


def _describe_evaluation(args) -> str:
    annotation_file = Path(args.validation_annotation_file or args.train_annotation_file).name
    which = "the training set itself" if args.validation_annotation_file is None else f"`{annotation_file}`"
    boxes = f"detected person boxes from `{Path(args.detections_file).name}` with OKS NMS" if args.detections_file else "ground-truth person boxes"
    flip = "flip test on" if args.flip_test else "no flip test"
    return f"Evaluated on {which} with {boxes}, {flip}, `{args.decoder}` heatmap decoding"


def _hyperparameters(args, accelerator, total_steps) -> dict:
    return {
        "input size": f"{args.image_size[0]}x{args.image_size[1]}, box padding {args.box_padding}",
        "flip / half body / scale / rotation": f"{args.flip_probability} / {args.half_body_probability} / "
        f"{args.scale_factor} / {args.rotation_factor} deg (p {args.rotation_probability})",
        "random erasing": args.random_erasing_probability,
        "heatmap sigma": args.heatmap_sigma if args.heatmap_sigma is not None else "1 per 24 heatmap columns",
        **recipe_hyperparameters(args, accelerator, total_steps),
    }


if __name__ == "__main__":
    main()
