"""The box pipelines (`cmsa_hf.pipelines`): keypoint detection and head pose, from boxes or from a detector."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_transformers_integration import (
    BOXES,
    _numbers,
    _run_without_the_package,
    _saved_head_pose_model,
    _saved_pose_model,
    _strings,
)
from transformers import (
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessorPil,
    RTDetrResNetConfig,
    pipeline,
)


def _image(seed, height=40, width=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _no_prompt(monkeypatch):
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    return prompts


def test_keypoint_detection_pipeline(tmp_path, monkeypatch):
    model, processor = _saved_pose_model(tmp_path)
    prompts = _no_prompt(monkeypatch)
    pose = pipeline("keypoint-detection", model=str(tmp_path))
    assert not prompts
    image = _image(1)
    people = pose(image, boxes=BOXES)
    assert [person["bbox"] for person in people] == BOXES
    assert [k["label"] for k in people[0]["keypoints"]] == model.config.keypoint_names
    with torch.no_grad():
        outputs = model(**processor(image, boxes=BOXES, return_tensors="pt"))
    expected = processor.post_process_keypoint_detection(outputs, [BOXES])[0]
    for person, reference in zip(people, expected):
        np.testing.assert_allclose([[k["x"], k["y"]] for k in person["keypoints"]], reference["keypoints"], atol=1e-4)
    # the same boxes as a NumPy array, as a tensor, and in VitPose's form (one array per image)
    for boxes in (np.array(BOXES), torch.tensor(BOXES), [np.array(BOXES)]):
        assert pose(image, boxes=boxes) == people
    confident = pose({"image": image, "boxes": BOXES[:1]}, threshold=1e9)
    assert confident[0]["keypoints"] == []
    assert pose(image, boxes=[]) == []  # no person: no result, and the model is not run on an empty batch
    with pytest.raises(ValueError, match="lies outside"):
        pose(image, boxes=[[100, 100, 10, 10]])
    sixteen_bit = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)  # the processor's conversion
    assert pose(sixteen_bit, boxes=BOXES) == pose(image.convert("L").convert("RGB"), boxes=BOXES)


def test_head_pose_pipeline(tmp_path, monkeypatch):
    model, processor = _saved_head_pose_model(tmp_path)
    prompts = _no_prompt(monkeypatch)
    head_pose = pipeline("head-pose-estimation", model=str(tmp_path))
    assert not prompts
    image = _image(2)
    faces = head_pose(image, boxes=BOXES, return_rotation_matrix=True)
    with torch.no_grad():
        expected = model(**processor(image, boxes=BOXES, return_tensors="pt")).angles
    assert [face["bbox"] for face in faces] == BOXES
    for face, angles in zip(faces, expected.tolist()):
        np.testing.assert_allclose([face["yaw"], face["pitch"], face["roll"]], angles, atol=1e-4)
        assert np.asarray(face["rotation_matrix"]).shape == (3, 3)
    (whole,) = head_pose(image, boxes=[[0, 0, 32, 40]], flip_test=True)
    assert whole["bbox"] == [0, 0, 32, 40] and set(whole) == {"bbox", "yaw", "pitch", "roll"}
    assert head_pose(image, boxes=[]) == []
    with pytest.raises(ValueError, match="zero or negative size"):
        head_pose(image, boxes=[[0, 0, 0, 5]])


# -------------------------------------------------------------------------------------------- batching

# Seven images of four sizes with 0 to 3 boxes each, every box different.
BOX_COUNTS = [2, 0, 3, 1, 0, 3, 1]


def _batch_inputs(folder):
    """The images saved as png files (the remote-code run reads them) and the pipeline inputs."""
    inputs = []
    for index, count in enumerate(BOX_COUNTS):
        height, width = 40 + 6 * (index % 4), 32 + 4 * (index % 3)
        path = folder / f"image{index}.png"
        _image(10 + index, height, width).save(path)
        boxes = [[1.0 + 2 * index + 3 * box, 2.0 + box, 10.0 + index + box, 14.0 + 2 * box] for box in range(count)]
        inputs.append({"image": str(path), "boxes": boxes})
    return inputs


# Each image alone, then all seven in one call at batch sizes 1 to 4: `{"alone": [...], "1": [...], ...}`.
_ALONE_AND_BATCHED = """
import json
from transformers import pipeline
pipe = pipeline({task!r}, model={folder!r}, trust_remote_code=True)
inputs = json.loads({inputs!r})
results = {{"module": type(pipe).__module__, "alone": [pipe(item) for item in inputs]}}
results.update({{str(batch_size): pipe(inputs, batch_size=batch_size) for batch_size in (1, 2, 3, 4)}})
print(json.dumps(results))
"""


def _assert_same_predictions(batched, alone, where):
    """Image by image: the same boxes (exactly) and the same predictions (to float32 rounding of batched maths)."""
    assert len(batched) == len(alone) == len(BOX_COUNTS), where
    for index, (image_batched, image_alone) in enumerate(zip(batched, alone)):
        assert [r["bbox"] for r in image_batched] == [r["bbox"] for r in image_alone], (where, index)
        assert len(image_alone) == BOX_COUNTS[index], (where, index)
        for result_batched, result_alone in zip(image_batched, image_alone):
            assert _strings(result_batched) == _strings(result_alone), (where, index)
            np.testing.assert_allclose(_numbers(result_batched), _numbers(result_alone), rtol=0, atol=1e-4, err_msg=f"{where} {index}")


@pytest.mark.parametrize(
    "task, save",
    [("keypoint-detection", lambda folder: _saved_pose_model(folder)), ("head-pose-estimation", _saved_head_pose_model)],
    ids=["keypoints", "head-pose"],
)
def test_batched_equals_alone_installed_and_as_remote_code(tmp_path, task, save):
    """Every batch size from 1 to 4 over images of 0 to 3 boxes gives each image what it gets alone, with cmsa_hf
    installed and through the remote code of the saved folder (cmsa_hf not importable)."""
    save(tmp_path / "model")
    inputs = _batch_inputs(tmp_path)
    body = _ALONE_AND_BATCHED.format(task=task, folder=str(tmp_path / "model"), inputs=json.dumps(inputs))
    for where, run in (("installed", lambda: _run_without_the_package(tmp_path, body, package=True)),
                       ("remote", lambda: _run_without_the_package(tmp_path, body))):  # fmt: skip
        results = run()
        assert results["module"].startswith("cmsa_hf." if where == "installed" else "transformers_modules."), where
        for batch_size in ("1", "2", "3", "4"):
            _assert_same_predictions(results[batch_size], results["alone"], f"{where}, batch_size={batch_size}")
    pipe = pipeline(task, model=str(tmp_path / "model"))
    alone = [pipe(item) for item in inputs]
    for batch_size in (2, 4):
        _assert_same_predictions(pipe(inputs, batch_size=batch_size), alone, f"in process, batch_size={batch_size}")
        # the call-level boxes apply to every image of a list
        shared = pipe([item["image"] for item in inputs[:3]], boxes=BOXES, batch_size=batch_size)
        assert [[r["bbox"] for r in image] for image in shared] == [BOXES] * 3


def test_a_batched_image_does_not_take_another_images_face(tmp_path):
    """The reported case: two images of two and one faces at batch_size=2."""
    _saved_head_pose_model(tmp_path)
    head_pose = pipeline("head-pose-estimation", model=str(tmp_path))
    image = _image(3)
    b1, b2, b3 = [1.0, 1.0, 20.0, 20.0], [8.0, 12.0, 16.0, 18.0], [4.0, 6.0, 24.0, 30.0]
    batched = head_pose([{"image": image, "boxes": [b1, b2]}, {"image": image, "boxes": [b3]}], batch_size=2)
    assert [[face["bbox"] for face in faces] for faces in batched] == [[b1, b2], [b3]]
    assert batched[1][0]["yaw"] == pytest.approx(head_pose(image, boxes=[b3])[0]["yaw"], abs=1e-4)


# -------------------------------------------------------------------------------------------- box forms


def test_flat_box_for_one_image_is_one_box(tmp_path):
    """A flat [x, y, width, height] for one image is that image's one box, in the pipelines as in the processor."""
    _saved_pose_model(tmp_path)
    pose = pipeline("keypoint-detection", model=str(tmp_path))
    image = _image(4)
    assert pose(image, boxes=BOXES[0]) == pose(image, boxes=[BOXES[0]])
    assert pose({"image": image, "boxes": np.array(BOXES[1])}) == pose(image, boxes=[BOXES[1]])
    with pytest.raises(ValueError, match=r"boxes holds 2 lists of boxes for one image"):
        pose(image, boxes=[[BOXES[0]], [BOXES[1]]])


def test_no_boxes_and_no_detector_is_a_clear_error(tmp_path):
    _saved_pose_model(tmp_path)
    pose = pipeline("keypoint-detection", model=str(tmp_path))
    message = r"no boxes for the image: pass boxes=\[\[x, y, width, height\], \.\.\.\].*\[\[0, 0, 32, 40\]\] for the whole image.*detector="
    with pytest.raises(ValueError, match=message):
        pose(_image(5))
    with pytest.raises(ValueError, match=message):
        pose([{"image": _image(5), "boxes": BOXES}, {"image": _image(6)}], batch_size=2)
    with pytest.raises(TypeError, match="detector must be an object-detection pipeline, model or model name, got int"):
        pose(_image(5), detector=3)


# -------------------------------------------------------------------------------------------- detector


def tiny_person_detector(seed=0):
    """An untrained RT-DETR (six queries, labels "person" and "car") as an object-detection pipeline."""
    torch.manual_seed(seed)
    backbone = RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]
    )
    config = RTDetrConfig(
        backbone_config=backbone, d_model=32, encoder_hidden_dim=32, encoder_in_channels=[8, 8, 8], encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        decoder_n_points=2, decoder_in_channels=[32, 32, 32], num_queries=6, num_denoising=0,
        id2label={0: "person", 1: "car"}, label2id={"person": 0, "car": 1},
    )  # fmt: skip
    model = RTDetrForObjectDetection(config).eval()
    with torch.no_grad():  # spread the scores so that a threshold splits them
        model.model.enc_score_head.bias.zero_()
        for head in model.model.decoder.class_embed:
            head.bias.copy_(torch.tensor([0.0, -0.5]))
            head.weight.normal_(0, 0.5)
    return pipeline("object-detection", model=model, image_processor=RTDetrImageProcessorPil(size={"height": 64, "width": 64}))


def _coco_boxes(detections, labels=None):
    boxes = []
    for detection in detections:
        box = detection["box"]
        if labels is None or detection["label"] in labels:
            boxes.append([float(box["xmin"]), float(box["ymin"]), float(box["xmax"] - box["xmin"]), float(box["ymax"] - box["ymin"])])
    return boxes


@pytest.mark.parametrize("task, save", [("keypoint-detection", _saved_pose_model), ("head-pose-estimation", _saved_head_pose_model)])
def test_boxes_come_from_the_detector(tmp_path, task, save):
    save(tmp_path)
    detector = tiny_person_detector()
    image = _image(7, 120, 160)
    everything = detector(image, threshold=0.0)
    scores = sorted(d["score"] for d in everything)
    threshold = scores[len(scores) // 2]
    kept = [d for d in detector(image, threshold=threshold) if d["label"] == "person"]
    assert 0 < len(kept) < len(everything) and all(_coco_boxes(kept)[i][2] > 0 for i in range(len(kept)))

    pipe = pipeline(task, model=str(tmp_path), detector=detector, detector_labels=["person"], detector_threshold=threshold)
    found = pipe(image)
    assert [r["bbox"] for r in found] == _coco_boxes(kept)  # the crops follow the detector's boxes
    assert [r["detection"] for r in found] == [{"label": "person", "score": d["score"]} for d in kept]
    given = pipe(image, boxes=_coco_boxes(kept))  # the same boxes given by hand: the same predictions
    assert [{k: v for k, v in r.items() if k != "detection"} for r in found] == given
    # every label, the detector's default threshold, a detector per call, and batches of photos
    every_label = pipeline(task, model=str(tmp_path))(image, detector=detector, detector_threshold=0.0)
    assert [r["bbox"] for r in every_label] == _coco_boxes(everything)
    batched = pipe([image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image], batch_size=3)
    assert [r["bbox"] for r in batched[0]] == [r["bbox"] for r in batched[2]] == [r["bbox"] for r in found]
    np.testing.assert_allclose(_numbers(batched[2]), _numbers(found), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"the detector has no label \['persons'\]; its labels are \['car', 'person'\]"):
        pipe(image, detector_labels="persons")


# The README's "photo -> persons -> keypoints", run as it is written there.
PHOTO_TO_KEYPOINTS = '''
import numpy as np
import torch
from PIL import Image
from transformers import (
    RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessorPil, RTDetrResNetConfig, pipeline,
)
import cmsa_hf  # registers the keypoint-detection pipeline
from cmsa_hf import CMSAConfig, CMSAForKeypointDetection, CMSAImageProcessor

# The pose model: a saved CMSA keypoint folder (an untrained one here; use your trained or converted folder).
config = CMSAConfig.from_variant("cmsa-s", image_size=(32, 24))
CMSAForKeypointDetection(config).save_pretrained("cmsa-pose")
CMSAImageProcessor.for_config(config, keypoint_names=config.keypoint_names).save_pretrained("cmsa-pose")

# The person detector: any transformers object-detection pipeline (or model, or model name). From the Hub:
#     detector = pipeline("object-detection", model="PekingU/rtdetr_r50vd_coco_o365")
# Offline, an untrained RT-DETR with a "person" label stands in for it:
torch.manual_seed(0)
detector_config = RTDetrConfig(
    backbone_config=RTDetrResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage2", "stage3", "stage4"]
    ),
    d_model=32, encoder_hidden_dim=32, encoder_in_channels=[8, 8, 8], encoder_ffn_dim=32, decoder_ffn_dim=32,
    encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, decoder_n_points=2,
    decoder_in_channels=[32, 32, 32], num_queries=6, num_denoising=0,
    id2label={0: "person"}, label2id={"person": 0},
)
detector = pipeline(
    "object-detection",
    model=RTDetrForObjectDetection(detector_config).eval(),
    image_processor=RTDetrImageProcessorPil(size={"height": 64, "width": 64}),
)

# photo -> persons (the detector's "person" boxes scoring >= 0.3) -> 17 keypoints per person
pose = pipeline("keypoint-detection", model="cmsa-pose", detector=detector, detector_labels=["person"], detector_threshold=0.3)
photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))  # Image.open("photo.jpg")
for person in pose(photo):
    nose = person["keypoints"][0]
    print(person["bbox"], person["detection"], nose["label"], round(nose["x"], 1), round(nose["y"], 1))
'''


def test_photo_to_persons_to_keypoints_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(PHOTO_TO_KEYPOINTS, "photo_to_keypoints", "exec"), namespace)
    detector, pose, photo = namespace["detector"], namespace["pose"], namespace["photo"]
    persons = [d for d in detector(photo, threshold=0.3) if d["label"] == "person"]
    lines = printed.getvalue().splitlines()
    assert len(lines) == len(persons) > 0 and all("'label': 'person'" in line and " nose " in line for line in lines)
    assert [r["bbox"] for r in pose(photo)] == _coco_boxes(persons)


def test_vitpose_docs_example_runs_on_a_cmsa_folder(tmp_path):
    """transformers' VitPose usage example, transcribed with the Hub models replaced by a saved CMSA keypoint folder
    (AutoModelForPoseEstimation for VitPoseForPoseEstimation) and an untrained RT-DETR."""
    from transformers import AutoModelForPoseEstimation, AutoProcessor

    _saved_pose_model(tmp_path)
    detector = tiny_person_detector()
    person_image_processor, person_model = detector.image_processor, detector.model
    image = _image(8, 120, 160)

    inputs = person_image_processor(images=image, return_tensors="pt").to(person_model.device)
    with torch.no_grad():
        outputs = person_model(**inputs)
    results = person_image_processor.post_process_object_detection(
        outputs, target_sizes=torch.tensor([(image.height, image.width)]), threshold=0.3
    )
    result = results[0]
    person_boxes = result["boxes"][result["labels"] == 0]
    person_boxes = person_boxes.cpu().numpy()
    person_boxes[:, 2] = person_boxes[:, 2] - person_boxes[:, 0]
    person_boxes[:, 3] = person_boxes[:, 3] - person_boxes[:, 1]

    image_processor = AutoProcessor.from_pretrained(str(tmp_path))
    model = AutoModelForPoseEstimation.from_pretrained(str(tmp_path), device_map="auto")
    inputs = image_processor(image, boxes=[person_boxes], return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model(**inputs)
    pose_results = image_processor.post_process_pose_estimation(outputs, boxes=[person_boxes])
    image_pose_result = pose_results[0]
    xy = torch.stack([pose_result["keypoints"] for pose_result in image_pose_result]).cpu().numpy()
    scores = torch.stack([pose_result["scores"] for pose_result in image_pose_result]).cpu().numpy()

    assert len(person_boxes) > 0 and xy.shape == (len(person_boxes), 17, 2) and scores.shape == (len(person_boxes), 17)
    reference = image_processor.post_process_keypoint_detection(outputs, [person_boxes])[0]
    np.testing.assert_array_equal(xy, np.stack([pose["keypoints"].numpy() for pose in reference]))
    with pytest.raises(TypeError, match="no equivalent of VitPose's 'dataset_index'"):
        model(**inputs, dataset_index=torch.tensor([0]))
