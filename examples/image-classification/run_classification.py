#!/usr/bin/env python
"""Train (or fine-tune) a CMSA image classifier with Accelerate, then evaluate it and write a Hub-ready folder.

Data: a Hub data set (--dataset_name uoft-cs/cifar10), image folders or zip archives (--train_dir,
--validation_dir; the `datasets` imagefolder layout), or the embedded default (--dataset_name digits, scikit-learn's
handwritten digits: no download). Model: a saved folder or Hub id (--model_name_or_path), or a preset from scratch
(--variant cmsa-s). Defaults follow the paper's (DeiT) recipe for CIFAR.

    accelerate launch examples/image-classification/run_classification.py --dataset_name digits \
        --variant cmsa-s --image_size 16 16 --output_dir outputs/digits-cmsa-s

The same as `cmsa-hf train image-classification` (installed with the package); the task lives in `cmsa_hf.tasks`.
"""

from cmsa_hf.tasks import ImageClassificationTask, run


def main(argv=None) -> dict:
    return run(ImageClassificationTask(), argv, description=__doc__)


if __name__ == "__main__":
    main()
