#!/usr/bin/env python
"""Train (or fine-tune) a CMSA head-pose model (yaw, pitch, roll from a face crop) with Accelerate, evaluate its
mean absolute error and write a Hub-ready folder.

The paper's protocol: train on 300W-LP, test on AFLW2000-3D (samples with an angle beyond +-99 degrees removed) and
on BIWI. Defaults follow its recipe (AdamW 2.5e-3, cosine, batch 96, 100 epochs, 32x32, ImageNet normalisation).

    accelerate launch examples/head-pose/run_head_pose.py --train_data 300W_LP --train_format 300w_lp \
        --validation_data AFLW2000 --validation_format aflw2000 --variant cmsa-s --output_dir outputs/head-pose-cmsa-s

Without a validation set, `--validation_split_size N` holds out N training faces (seeded).

The same as `cmsa-hf train head-pose` (installed with the package); the task lives in `cmsa_hf.tasks`.
"""

from cmsa_hf.tasks import HeadPoseTask, run


def main(argv=None) -> dict:
    return run(HeadPoseTask(), argv, description=__doc__)


if __name__ == "__main__":
    main()
