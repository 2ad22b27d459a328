"""cmsa_hf inside the transformers ecosystem: remote code, pipelines and Trainer."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import randomise_batch_norms, tiny_config
from PIL import Image
from transformers import pipeline

from cmsa_hf import CMSAForHeadPoseEstimation, CMSAForImageClassification, CMSAForKeypointDetection, CMSAImageProcessor


LABELS = {0: "dark", 1: "bright"}


def _saved_classifier(folder, **overrides):
    config = tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **overrides)
    torch.manual_seed(0)
    model = CMSAForImageClassification(config).eval()
    model.save_pretrained(folder)
    CMSAImageProcessor.for_config(config).save_pretrained(folder)
    return model


def _run_without_the_package(tmp_path, body: str, package: bool = False) -> dict:
    """Run `body` in a fresh interpreter where importing cmsa_hf fails (or, with `package`, where it is imported
    first); it prints one JSON line."""
    first = "import cmsa_hf\n" if package else 'import sys\nsys.modules["cmsa_hf"] = None  # as if not installed\n'
    script = first + textwrap.dedent(body)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home")}
    env.update({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})  # a worktree's copy
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_remote_code_loads_without_the_package(tmp_path):
    model = _saved_classifier(tmp_path / "model")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    pixels = CMSAImageProcessor.for_config(model.config)(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(pixels).logits[0].tolist()

    loaded = _run_without_the_package(
        tmp_path,
        f"""
        import json
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
        """,
    )
    assert loaded["model"].startswith("transformers_modules.")  # the copied code, not the package
    np.testing.assert_allclose(loaded["logits"], expected, rtol=1e-5, atol=1e-5)


BOXES = [[4.0, 2.0, 20.0, 30.0], [10.0, 8.0, 12.0, 14.0]]


def _saved_pose_model(folder):
    torch.manual_seed(0)
    model = randomise_batch_norms(CMSAForKeypointDetection(tiny_config()), seed=3).eval()
    model.save_pretrained(folder)
    processor = CMSAImageProcessor.for_config(model.config, keypoint_names=model.config.keypoint_names)
    processor.save_pretrained(folder)
    return model, processor


def test_pose_model_loads_as_remote_code(tmp_path):
    model, processor = _saved_pose_model(tmp_path / "model")
    assert (tmp_path / "model" / "codecs.py").is_file()  # modeling_cmsa imports it
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    with torch.no_grad():
        outputs = model(**processor(image, boxes=BOXES, return_tensors="pt"), flip_test=True)
    expected = [pose["keypoints"].tolist() for pose in processor.post_process_keypoint_detection(outputs, [BOXES])[0]]

    loaded = _run_without_the_package(
        tmp_path,
        f"""
        import json
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModelForKeypointDetection
        folder = {str(tmp_path / "model")!r}
        model = AutoModelForKeypointDetection.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        boxes = {BOXES!r}
        inputs = processor(Image.open({str(tmp_path / "image.png")!r}), boxes=boxes, return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs, flip_test=True)
        poses = processor.post_process_keypoint_detection(outputs, [boxes])[0]
        print(json.dumps({{"model": type(model).__module__, "keypoints": [p["keypoints"].tolist() for p in poses]}}))
        """,
    )
    assert loaded["model"].startswith("transformers_modules.")
    np.testing.assert_allclose(loaded["keypoints"], expected, rtol=0, atol=1e-4)


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


def _saved_head_pose_model(folder, head="binned"):
    torch.manual_seed(0)
    model = randomise_batch_norms(CMSAForHeadPoseEstimation(tiny_config(head_pose_head=head)), seed=4).eval()
    model.save_pretrained(folder)
    processor = CMSAImageProcessor.for_config(model.config, box_padding=1.0)
    processor.save_pretrained(folder)
    return model, processor


@pytest.mark.parametrize("head", ["binned", "ssr"])
def test_head_pose_model_loads_as_remote_code(tmp_path, head):
    model, processor = _saved_head_pose_model(tmp_path / "model", head)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 32, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    with torch.no_grad():
        expected = model(**processor(image, boxes=BOXES, return_tensors="pt")).angles.tolist()
    loaded = _run_without_the_package(
        tmp_path,
        f"""
        import json
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel
        folder = {str(tmp_path / "model")!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(Image.open({str(tmp_path / "image.png")!r}), boxes={BOXES!r}, return_tensors="pt")
        with torch.no_grad():
            angles = model(**inputs).angles.tolist()
        print(json.dumps({{"model": type(model).__name__, "angles": angles}}))
        """,
    )
    assert loaded["model"] == "CMSAForHeadPoseEstimation"
    np.testing.assert_allclose(loaded["angles"], expected, rtol=1e-5, atol=1e-4)


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


# Every Auto class and pipeline a saved folder of each task answers to (tiny model, random image, two boxes).
TASK_LOADERS = {
    "classification": (
        lambda folder: _saved_classifier(folder),
        ["AutoModelForImageClassification", "AutoModel"],
        "image-classification",
    ),
    "keypoints": (
        lambda folder: _saved_pose_model(folder)[0],
        ["AutoModelForKeypointDetection", "AutoModelForPoseEstimation", "AutoModel"],
        "keypoint-detection",
    ),
    "head-pose": (lambda folder: _saved_head_pose_model(folder)[0], ["AutoModel"], "head-pose-estimation"),
}

_LOAD_EVERY_WAY = """
import json
import torch
import transformers
from PIL import Image
folder, image, boxes = {folder!r}, Image.open({image!r}), {boxes!r}
result = {{}}
processor = transformers.AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(image, **({{}} if boxes is None else {{"boxes": boxes}}), return_tensors="pt")
for auto_class in {auto_classes!r}:
    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        first_output = model(**inputs)[0]
    result[auto_class] = [type(model).__module__, type(model).__name__, first_output.flatten().tolist()]
pipe = transformers.pipeline({task!r}, model=folder, trust_remote_code=True)
result["pipeline"] = [type(pipe).__module__, pipe(image, **({{}} if boxes is None else {{"boxes": boxes}}))]
print(json.dumps(result))
"""


@pytest.mark.parametrize("task", list(TASK_LOADERS))
def test_every_folder_loads_through_its_auto_classes_and_pipeline_with_and_without_the_package(tmp_path, task):
    save, auto_classes, pipeline_task = TASK_LOADERS[task]
    save(tmp_path / "model")
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    body = _LOAD_EVERY_WAY.format(
        folder=str(tmp_path / "model"), image=str(tmp_path / "image.png"),
        boxes=None if task == "classification" else BOXES, auto_classes=auto_classes, task=pipeline_task,
    )  # fmt: skip
    remote = _run_without_the_package(tmp_path, body)
    installed = _run_without_the_package(tmp_path, body, package=True)
    for auto_class in auto_classes:
        (remote_module, remote_name, remote_output), (module, name, output) = remote[auto_class], installed[auto_class]
        assert remote_module.startswith("transformers_modules.") and module.startswith("cmsa_hf."), auto_class
        # transformers has no head-pose Auto class: remote code exports the head-pose model under AutoModel, while
        # with cmsa_hf installed AutoModel gives the backbone, as for every other task.
        assert (remote_name, name) == (name, name) or (task, auto_class, remote_name, name) == (
            "head-pose", "AutoModel", "CMSAForHeadPoseEstimation", "CMSAModel"
        ), auto_class
        if remote_name != name:
            continue
        np.testing.assert_allclose(remote_output, output, rtol=1e-5, atol=1e-5, err_msg=auto_class)
    (remote_module, remote_predictions), (module, predictions) = remote["pipeline"], installed["pipeline"]
    if pipeline_task != "image-classification":  # transformers' own pipeline serves classifiers in both cases
        assert remote_module.startswith("transformers_modules.") and module.startswith("cmsa_hf."), pipeline_task
    assert _strings(remote_predictions) == _strings(predictions) and len(predictions) > 0
    np.testing.assert_allclose(_numbers(remote_predictions), _numbers(predictions), rtol=1e-5, atol=1e-4)


def _strings(value) -> list:
    if isinstance(value, dict):
        return [s for key in sorted(value) for s in [key, *_strings(value[key])]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value] if isinstance(value, str) else []


def _numbers(value) -> list:
    if isinstance(value, dict):
        return [n for key in sorted(value) for n in _numbers(value[key])]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [] if isinstance(value, str) else [float(value)]
