#!/usr/bin/env python
"""Fine-tune a saved CMSA classifier with `transformers.Trainer` and write a Hub-ready folder: the same as
`cmsa-hf finetune image-classification` (the logic lives in `cmsa_hf.tasks.trainer`; copy it from there).

    python examples/image-classification/run_trainer.py --model_name_or_path outputs/digits-cmsa-s \
        --train_dir my_images/ --output_dir outputs/finetuned --num_train_epochs 3 --learning_rate 5e-4 \
        --per_device_train_batch_size 32 --eval_strategy epoch --save_strategy epoch

Every `TrainingArguments` flag is available.
"""

from cmsa_hf.tasks.trainer import finetune


def main(argv=None) -> dict:
    return finetune(argv)


if __name__ == "__main__":
    main()
