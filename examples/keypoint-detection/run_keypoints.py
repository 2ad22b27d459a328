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

The same as `cmsa-hf train keypoint-detection` (installed with the package); the task lives in `cmsa_hf.tasks`.
"""

from cmsa_hf.tasks import KeypointDetectionTask, run


def main(argv=None) -> dict:
    return run(KeypointDetectionTask(), argv, description=__doc__)


if __name__ == "__main__":
    main()
