"""Top-down human pose (COCO person keypoints): heatmap training with the HRNet augmentation protocol, COCO OKS
AP / AR (pycocotools) with ground-truth or detected boxes (OKS NMS), PCK and the heatmap loss."""

import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..codecs import DECODERS
from .. import evaluation
from ..data.coco import keypoint_metadata, load_coco_keypoints, read_keypoint_category
from ..data.transforms import TopDownTransform
from ..hub import keypoint_detection_card
from ..image_processing_cmsa import CMSAImageProcessor
from ..metrics import OKS_NMS_THRESHOLD
from ..modeling_cmsa import CMSAForKeypointDetection
from .base import Task


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


class KeypointDetectionTask(Task):
    name = "keypoint-detection"
    model_class = CMSAForKeypointDetection
    make_card = staticmethod(keypoint_detection_card)
    extras = ("train", "pose")
    training_unit = "person instances"
    offers_eval_before_training = True
    recipe = {
        **Task.recipe,
        "image_size": (32, 24),
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 128,
        "num_train_epochs": 210,
        "box_padding": 1.25,
        "flip_probability": 0.5,
        "half_body_probability": 0.3,
        "scale_factor": 0.35,
        "rotation_factor": 45.0,
        "rotation_probability": 0.6,
        "random_erasing_probability": 0.0,
    }

    def add_arguments(self, parser):
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
        data.add_argument(
            "--validation_dataset_name", type=str, default=None,
            help="The card's name of the data set of --validation_annotation_file (default: the file's name).",
        )  # fmt: skip
        data.add_argument(
            "--keypoint_metadata_file", type=str, default=None,
            help="A JSON object of config keypoint fields (keypoint_sigmas, flip_pairs, upper_body_keypoints, ...) "
            "over those of the training file's category (from scratch) or of the saved model.",
        )  # fmt: skip

        model = parser.add_argument_group("heatmaps")
        model.add_argument("--heatmap_sigma", type=float, default=None, help="Default: 1 per 24 heatmap columns.")
        model.add_argument("--decoder", choices=DECODERS, default="dark")
        model.add_argument("--flip_test", action=argparse.BooleanOptionalAction, default=True, help="At evaluation.")

        augment = parser.add_argument_group("augmentation (HRNet protocol defaults)")
        augment.add_argument("--box_padding", type=float)
        augment.add_argument("--flip_probability", type=float)
        augment.add_argument("--half_body_probability", type=float)
        augment.add_argument("--scale_factor", type=float)
        augment.add_argument("--rotation_factor", type=float)
        augment.add_argument("--rotation_probability", type=float)
        augment.add_argument("--random_erasing_probability", type=float)

    def load_data(self, args):
        train = load_split(args.train_annotation_file, args.train_image_dir, args.max_train_samples)
        self.eval_annotation_file = args.validation_annotation_file or args.train_annotation_file
        self.eval_set = load_split(
            self.eval_annotation_file,
            args.validation_image_dir or args.train_image_dir,
            args.max_eval_samples,
            args.detections_file,
            args.min_detection_score,
        )
        self.category = read_keypoint_category(self.eval_annotation_file)
        return {"train": train, "validation": self.eval_set}

    def create_model(self, args, data=None):
        # The keypoint set (names, skeleton, flip pairs, sigmas, upper body): from scratch the training file's, else
        # the saved model's; --keypoint_metadata_file on top.
        from_file = None if args.model_name_or_path else args.train_annotation_file
        model = self.load_or_create_model(args, **keypoint_metadata(from_file, args.keypoint_metadata_file))
        processor = CMSAImageProcessor.for_config(
            model.config, box_padding=args.box_padding, heatmap_sigma=args.heatmap_sigma, decoder=args.decoder,
            keypoint_names=model.config.keypoint_names,
        )  # fmt: skip
        return model, processor

    def transforms(self, args, model, processor):
        self.processor, self.codec = processor, processor.heatmap_codec(model.config.stage_resolutions()[0])
        train = TopDownTransform(
            processor, self.codec, model.config.flip_pairs, train=True, seed=args.seed,
            flip_probability=args.flip_probability, half_body_probability=args.half_body_probability,
            scale_factor=args.scale_factor, rotation_factor=args.rotation_factor,
            rotation_probability=args.rotation_probability, random_erasing_probability=args.random_erasing_probability,
            upper_body=model.config.upper_body_keypoints,
        )  # fmt: skip
        self.sigmas = model.config.keypoint_sigmas
        return train, TopDownTransform(processor, self.codec, model.config.flip_pairs)

    def compute_loss(self, args, model, batch):
        return model(
            pixel_values=batch["pixel_values"], target_heatmaps=batch["target_heatmaps"],
            target_weights=batch["target_weights"],
        ).loss  # fmt: skip

    def evaluation_outputs(self, args, model, batch):
        heatmaps = model(pixel_values=batch["pixel_values"], flip_test=args.flip_test).heatmaps
        loss = model.head.loss(heatmaps, batch["target_heatmaps"], batch["target_weights"], reduction="none")
        keypoints, scores = self.codec.decode(heatmaps)
        return {"keypoints": keypoints, "scores": scores, "sample_index": batch["sample_index"], "loss": loss}

    def compute_metrics(self, args, outputs, name):
        """Map the decoded crops back to the images and score them with the `cmsa_coco_keypoints` module: COCOeval
        with the set's OKS sigmas over every image of the split (all images of the annotation file, or those of the
        `--max_eval_samples` subset), OKS NMS per image for detected boxes, the results json written to
        `<name>_keypoint_results.json`. With ground-truth boxes also PCK@0.05 of the box diagonal (`cmsa_pck`) and
        the heatmap loss."""
        rows = self.eval_set.select(outputs["sample_index"].tolist())
        keypoints, scores = outputs["keypoints"], outputs["scores"]
        boxes = [[box] for box in rows["box"]]
        poses = [image_poses[0] for image_poses in self.processor.crop_keypoints_to_image(keypoints, scores, boxes)]
        image_keypoints = np.stack([pose["keypoints"].numpy() for pose in poses])
        evaluated_images = sorted(set(rows["image_id"])) if args.max_eval_samples is not None else None
        coco = evaluation.load("cmsa_coco_keypoints", annotation_file=self.eval_annotation_file, image_ids=evaluated_images)
        average_precision = coco.compute(
            image_ids=rows["image_id"], keypoints=image_keypoints, keypoint_scores=scores.numpy(), boxes=rows["box"],
            box_scores=rows["score"], oks_nms_threshold=OKS_NMS_THRESHOLD if args.detections_file else None,
            results_file=Path(args.output_dir) / f"{name}_keypoint_results.json", sigmas=self.sigmas,
            category_id=self.category["id"],
        )  # fmt: skip
        metrics = {f"eval_{key}": round(value, 4) for key, value in average_precision.items()}
        metrics["eval_samples"] = int(len(rows))
        if not args.detections_file:
            diagonals = [math.hypot(w, h) for _, _, w, h in rows["box"]]
            correct = evaluation.load("cmsa_pck").compute(
                predictions=image_keypoints, references=rows["keypoints"], visible=rows["visibility"],
                normalizer=diagonals, threshold=0.05,
            )  # fmt: skip
            metrics["eval_pck"] = round(correct["pck"], 4)
            metrics["eval_loss"] = round(outputs["loss"].mean().item(), 6)
        return metrics

    def card_fields(self, args):
        return {
            "dataset_name": args.dataset_name,
            "dataset_description": f"COCO-format {self.category.get('name', 'keypoint')} keypoints "
            f"({len(self.category['keypoints'])} points) from `{Path(args.train_annotation_file).name}`",
            "eval_description": self._describe_evaluation(args),
            **self._evaluated_split(args),
            "box_padding": args.box_padding,
        }

    def _evaluated_split(self, args) -> dict:
        """The model-index data set and split: the training file's `--dataset_name` / train, or the validation file's
        data set (`--validation_dataset_name`, default the file's name) / validation."""
        if not args.validation_annotation_file:
            return {"eval_split": "train"}
        name = args.validation_dataset_name or Path(args.validation_annotation_file).stem
        return {"eval_dataset_name": name, "eval_split": "validation"}

    def _describe_evaluation(self, args) -> str:
        which = f"`{Path(self.eval_annotation_file).name}`" if args.validation_annotation_file else "the training set itself"
        if args.detections_file:
            boxes = f"detected person boxes from `{Path(args.detections_file).name}` with OKS NMS"
        else:
            boxes = "ground-truth person boxes"
        flip = "flip test on" if args.flip_test else "no flip test"
        return f"Evaluated on {which} with {boxes}, {flip}, `{args.decoder}` heatmap decoding"

    def hyperparameters(self, args):
        return {
            "input size": f"{args.image_size[0]}x{args.image_size[1]}, box padding {args.box_padding}",
            "flip / half body / scale / rotation": f"{args.flip_probability} / {args.half_body_probability} / "
            f"{args.scale_factor} / {args.rotation_factor} deg (p {args.rotation_probability})",
            "random erasing": args.random_erasing_probability,
            "heatmap sigma": args.heatmap_sigma if args.heatmap_sigma is not None else "1 per 24 heatmap columns",
        }
