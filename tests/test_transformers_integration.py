"""cmsa_hf inside the transformers ecosystem: remote code, pipelines and Trainer."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers import pipeline

from cmsa_hf import CMSAForImageClassification, CMSAImageProcessor


LABELS = {0: "dark", 1: "bright"}


def _saved_classifier(folder, **overrides):
    config = tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **overrides)
    torch.manual_seed(0)
    model = CMSAForImageClassification(config).eval()
    model.save_pretrained(folder)
    CMSAImageProcessor.for_config(config).save_pretrained(folder)
    return model


def test_remote_code_loads_without_the_package(tmp_path):
    model = _saved_classifier(tmp_path / "model")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    pixels = CMSAImageProcessor.for_config(model.config)(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(pixels).logits[0].tolist()

    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["cmsa_hf"] = None  # as if the package were not installed: any import of it fails
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        folder = {str(tmp_path / "model")!r}
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        pixels = processor(Image.open({str(tmp_path / "image.png")!r}), return_tensors="pt").pixel_values
        with torch.no_grad():
            logits = model(pixels).logits[0].tolist()
        print(json.dumps({{"model": type(model).__module__, "logits": logits}}))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model"].startswith("transformers_modules.")  # the copied code, not the package
    np.testing.assert_allclose(loaded["logits"], expected, rtol=1e-5, atol=1e-5)


def test_image_classification_pipeline(tmp_path, monkeypatch):
    _saved_classifier(tmp_path)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    classify = pipeline("image-classification", model=str(tmp_path))
    assert not prompts, "the pipeline asked whether to trust remote code although cmsa_hf is installed"
    image = Image.fromarray(np.full((24, 24, 3), 200, dtype=np.uint8))
    predictions = classify(image, top_k=2)
    assert {p["label"] for p in predictions} == {"dark", "bright"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)
    assert len(classify([image, image])) == 2


def test_trainer_lowers_the_loss(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(64):
        label = i % 2
        level = rng.integers(150, 256) if label else rng.integers(0, 100)
        noise = rng.integers(-30, 30, (16, 16, 3))
        images.append(Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8)))
        labels.append(label)
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())
    processor = CMSAImageProcessor(size={"height": 16, "width": 16})

    def transform(batch):
        return {"pixel_values": processor(batch["image"], return_tensors="pt").pixel_values, "labels": batch["label"]}

    def collate(rows):
        return {
            "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
            "labels": torch.tensor([r["labels"] for r in rows]),
        }

    torch.manual_seed(0)
    model = CMSAForImageClassification(tiny_config(num_labels=2))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_train_epochs=6,
        learning_rate=2e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset.with_transform(transform),
        data_collator=collate,
        processing_class=processor,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24
    assert np.mean(losses[-4:]) < 0.75 * np.mean(losses[:4]), losses
