"""Hub-ready folders: model cards holding the measured results, the reparameterized copy, and publishing."""

import copy
import json
import re
import tempfile
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from torch.utils.flop_counter import FlopCounterMode


# Card templates: the top-level model_cards/ folder, installed as the package data cmsa_hf/model_cards/ (setup.cfg).
MODEL_CARDS_DIR = next(
    folder for folder in (Path(__file__).resolve().parent / "model_cards", Path(__file__).resolve().parents[1] / "model_cards")
    if folder.is_dir()
)
REPARAMETERIZED_SUBFOLDER = "reparameterized"
# Never uploaded: resumable training states and tracker logs.
UPLOAD_IGNORE_PATTERNS = ["checkpoints/**", "runs/**", "*.tmp", "**/*.tmp/**"]


def count_flops(model: torch.nn.Module, image_size=None) -> int:
    """FLOPs of one forward pass on one image (`torch.utils.flop_counter`: matmuls, convolutions, attention) of
    `image_size` (default: the config's). Works for any transformers vision model given an `image_size`."""
    config = model.config
    size = tuple(image_size) if image_size is not None else tuple(config.image_size)
    channels = getattr(config, "num_channels", 3)
    pixels = torch.zeros(1, channels, *size, device=model.device, dtype=model.dtype)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixels)
    model.train(was_training)
    return counter.get_total_flops()


def model_facts(model) -> dict:
    """Parameter counts (train-time and folded) and GFLOPs of the folded model, as printed in the cards."""
    folded = copy.deepcopy(model).reparameterize()
    return {
        "parameters": model.num_parameters(),
        "parameters_reparameterized": folded.num_parameters(),
        "gflops": round(count_flops(folded) / 1e9, 4),
    }


def _template(name: str) -> str:
    path = MODEL_CARDS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"Model card template {path} not found (templates are package data in cmsa_hf/model_cards/)")
    return str(path)


def image_classification_card(
    model, results: dict, *, eval_split_description: str,
    training_script: str = "examples/image-classification/run_classification.py (Accelerate)", **run,
) -> ModelCard:  # fmt: skip
    """The card of a trained classifier; every number comes from `results` (all_results.json) or the model.
    `run`: dataset_name, dataset_description, hyperparameters, repo_id, base_model, has_reparameterized,
    hub_dataset_id."""
    config = model.config
    metrics = {
        key: metric for key, metric in MODEL_INDEX_METRICS["image-classification"].items()
        if TOP_K_METRICS.get(key, 0) < config.num_labels  # top-k of k >= num_labels classes is always 1
    }  # fmt: skip
    return _task_card(
        "image_classification.md",
        model,
        results,
        task="image-classification",
        tags=["image-classification"],
        metric_id="accuracy",
        metrics=metrics,
        num_labels=config.num_labels,
        label_names=", ".join(config.id2label[i] for i in range(config.num_labels)),
        eval_split_description=eval_split_description,
        training_script=training_script,
        train_samples=results["train_samples"],
        eval_samples=results["eval_samples"],
        **run,
    )


COCO_METRIC_NAMES = {"AP": "OKS AP", "AP50": "OKS AP50", "AP75": "OKS AP75", "APm": "OKS AP (medium)", "APl": "OKS AP (large)", "AR": "OKS AR"}


def keypoint_detection_card(model, results: dict, *, eval_description: str, **run) -> ModelCard:
    """The card of a trained top-down pose model; the COCO metrics come from `results` (all_results.json)."""
    config = model.config
    return _task_card(
        "keypoint_detection.md",
        model,
        results,
        task="keypoint-detection",
        tags=["keypoint-detection", "human-pose-estimation"],
        metric_id="oks-ap",
        metrics=MODEL_INDEX_METRICS["keypoint-detection"],
        num_keypoints=config.num_keypoints,
        keypoint_names=", ".join(config.keypoint_names),
        heatmap_size="x".join(map(str, config.stage_resolutions()[0])),
        eval_description=eval_description,
        metric_names=COCO_METRIC_NAMES,
        **run,
    )


HEAD_POSE_METRIC_NAMES = {"mae": "MAE (mean of yaw, pitch, roll)", "mae_yaw": "yaw MAE", "mae_pitch": "pitch MAE", "mae_roll": "roll MAE"}


def head_pose_card(model, results: dict, *, eval_description: str, **run) -> ModelCard:
    """The card of a trained head-pose model; the MAE values (degrees) come from `results` (all_results.json)."""
    config = model.config
    return _task_card(
        "head_pose.md",
        model,
        results,
        task="head-pose-estimation",
        tags=["head-pose-estimation"],
        metric_id="mae",
        metrics=MODEL_INDEX_METRICS["head-pose-estimation"],
        head=config.head_pose_head,
        bins=config.head_pose_bins,
        bin_width=config.head_pose_bin_width,
        regression_weight=config.head_pose_regression_weight,
        eval_description=eval_description,
        metric_names=HEAD_POSE_METRIC_NAMES,
        **run,
    )


# The model-index metrics of each task's card: all_results.json key (without "eval_") -> (metric type, name). The
# publish check matches a card's metrics back to all_results.json by these types.
MODEL_INDEX_METRICS = {
    "image-classification": {
        "accuracy": ("accuracy", "top-1 accuracy"),
        "top5_accuracy": ("top-5-accuracy", "top-5 accuracy"),
        "loss": ("cross-entropy", "cross-entropy loss"),
    },
    "keypoint-detection": {name: (f"oks-{name.lower()}", title) for name, title in COCO_METRIC_NAMES.items()},
    "head-pose-estimation": {name: (name, title) for name, title in HEAD_POSE_METRIC_NAMES.items()},
}
TOP_K_METRICS = {"top5_accuracy": 5}

# The card's `license_name` when the training data's terms (research use only) bind the weights.
DATA_TERMS_LICENSE_NAME = "research-only-training-data"
# Hub pipeline tags of the tasks that have one (head pose has none), and the tasks' names in the model-index.
PIPELINE_TAGS = {"image-classification": "image-classification", "keypoint-detection": "keypoint-detection"}
TASK_NAMES = {
    "image-classification": "Image Classification",
    "keypoint-detection": "Keypoint Detection (human pose)",
    "head-pose-estimation": "Head Pose Estimation",
}
# Folder names that name a split, not a data set (`cifar-mini/train` is the data set `cifar-mini`).
SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval", "evaluation"}


def dataset_name_of_folder(path) -> str:
    """The data set a local folder or archive holds, for the card: its name without an archive suffix, or its parent's
    name when the folder names a split (`cifar-mini/train` -> `cifar-mini`)."""
    path = Path(path).resolve()
    name = path.name.removesuffix(".zip").removesuffix(".tar.gz").removesuffix(".tar")
    return path.parent.name if name.lower() in SPLIT_FOLDER_NAMES else name


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repository id and is not a local path (a local folder is never a Hub id)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).exists()


def hub_base_model(model_name_or_path: str | None, base_model_id: str | None = None) -> str | None:
    """The card's `base_model:`: `base_model_id` (the Hub id a local checkpoint came from), else `model_name_or_path`
    when it is a Hub id; None for a local folder (a path links nowhere on the Hub) or training from scratch."""
    if base_model_id is not None:
        if not is_hub_repo_id(base_model_id):
            raise ValueError(f"--base_model_id {base_model_id!r} is not a Hub repository id (owner/name)")
        return base_model_id
    return model_name_or_path if model_name_or_path and is_hub_repo_id(model_name_or_path) else None


def check_card_metadata(metadata: dict, where) -> None:
    """Check card metadata as the Hub reads it: `base_model` and `datasets` are Hub ids (never local paths), the
    `pipeline_tag` is a Hub pipeline tag of a cmsa_hf task, `license: other` names its licence, and the model-index
    parses into eval results. Raises a ValueError naming `where` and the field."""
    for field in ("base_model", "datasets"):
        values = metadata.get(field) or []
        for value in [values] if isinstance(values, str) else values:
            if not is_hub_repo_id(value):
                raise ValueError(f"{where}: {field} {value!r} is not a Hub repository id (a local path links nowhere)")
    tag = metadata.get("pipeline_tag")
    if tag is not None and tag not in PIPELINE_TAGS.values():
        raise ValueError(f"{where}: pipeline_tag {tag!r} is not a Hub pipeline tag ({', '.join(PIPELINE_TAGS.values())})")
    if metadata.get("license") == "other" and not metadata.get("license_name"):
        raise ValueError(f"{where}: license 'other' needs a license_name")
    if "model-index" in metadata:
        try:
            model_index_to_eval_results(metadata["model-index"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: the model-index does not parse as Hub eval results ({error!r})") from None


# The card's usage snippets name the repository as `from_pretrained("<repo>"` and `model="<repo>"`.
_SNIPPET_REPO = re.compile(r'(?:from_pretrained\(|model=)"([^"]+)"')


def card_for_repo(card: ModelCard, repo_id: str) -> ModelCard:
    """A copy of `card` whose title, model name and usage snippets name `repo_id` (a training script writes the
    card before the repository is known, naming `--hub_model_id` or the output folder)."""
    card = ModelCard(card.content)
    name = repo_id.split("/")[-1]
    found = _SNIPPET_REPO.search(card.text)
    if found is not None:
        old = found.group(1)
        card.text = card.text.replace(f'"{old}"', f'"{repo_id}"').replace(f"# {old.split('/')[-1]}\n", f"# {name}\n", 1)
    card.data.model_name = name
    return card


def _task_card(
    template: str,
    model,
    results: dict,
    *,
    task: str,
    tags: list[str],
    metric_id: str,
    metrics: dict[str, tuple[str, str]],
    dataset_name: str,
    repo_id: str,
    base_model: str | None = None,
    base_model_id: str | None = None,
    eval_split: str = "validation",
    eval_dataset_name: str | None = None,
    hub_dataset_id: str | None = None,
    data_terms: str | None = None,
    **fields,
) -> ModelCard:
    """Card metadata (the headline metric `metric_id`; model-index entries `metrics`: result key -> (metric type,
    name), values `results["eval_" + key]`, measured on the `eval_split` of `eval_dataset_name`, default
    `dataset_name`) and the template filled with what every card shows (name, variant, size, cost) plus `fields`.
    `datasets:` links the Hub data set `hub_dataset_id` when the data has one; a local data set's name stays out of
    it (it would link nowhere). `base_model` is the checkpoint trained from (a folder or Hub id); the metadata names
    it only as a Hub id (`hub_base_model`). `data_terms`: the training data's terms of use, which the weights
    inherit (the licence is then `other`, and the card says so)."""
    hub_model = hub_base_model(base_model, base_model_id)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(task),
        license="other" if data_terms else "apache-2.0",
        license_name=DATA_TERMS_LICENSE_NAME if data_terms else None,
        tags=["cmsa", "low-resolution", *tags, "vision"],
        datasets=[hub_dataset_id] if hub_dataset_id else None,
        metrics=[metric_id],
        base_model=hub_model,
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type=task,
                task_name=TASK_NAMES[task],
                dataset_type=eval_dataset_name or hub_dataset_id or dataset_name,
                dataset_name=eval_dataset_name or dataset_name,
                dataset_split=eval_split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=results[f"eval_{key}"],
            )
            for key, (metric_type, metric_name) in metrics.items()
        ],
    )
    config = model.config
    height, width = config.image_size
    return ModelCard.from_template(
        card_data,
        template_path=_template(template),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        variant=config.variant.upper() if config.variant else "custom CMSA",
        image_height=height,
        image_width=width,
        initialisation=initialisation(base_model, hub_model),
        results=results,
        data_terms=data_terms,
        **fields,
        **model_facts(model),
    )


def initialisation(base_model: str | None, hub_model: str | None) -> str:
    """Where training started, as the card's text says it."""
    if not base_model:
        return "scratch (random initialisation)"
    if hub_model and hub_model != base_model:
        return f"the checkpoint `{base_model}` (the Hub model `{hub_model}`)"
    return f"the checkpoint `{base_model}`"


def write_hub_folder(output_dir, model, processor, results: dict, card: ModelCard, reparameterize: bool = False):
    """Save weights (safetensors), config, processor, `all_results.json` and the card; optionally a folded copy."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
    card.save(output_dir / "README.md")
    if reparameterize:
        save_reparameterized_copy(model, processor, output_dir)


def save_reparameterized_copy(model, processor, output_dir) -> Path:
    """Save the folded inference form of `model` (a copy; the model stays trainable) and the processor into
    `output_dir/reparameterized`."""
    folded_dir = Path(output_dir) / REPARAMETERIZED_SUBFOLDER
    copy.deepcopy(model).eval().reparameterize().save_pretrained(folded_dir)
    processor.save_pretrained(folded_dir)
    return folded_dir


def push_folder_to_hub(
    folder, repo_id: str, token: str | None = None, private: bool | None = False, revision: str | None = None,
    commit_message: str | None = None, commit_description: str | None = None, create_pr: bool = False,
) -> str:  # fmt: skip
    """Create the model repository if needed and upload the folder (without checkpoints and logs). Returns the
    repository's URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message or "Upload CMSA model trained with cmsa_hf",
        commit_description=commit_description,
        create_pr=create_pr,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
    )
    return str(url)


# Pipelines whose inputs are crops given by boxes (the card's snippet passes `boxes=`).
BOX_PIPELINE_TASKS = {"keypoint-detection", "head-pose-estimation"}


def pushed_model_card(model, repo_id: str, tags: list[str] | None = None) -> ModelCard:
    """The card of a model uploaded by `push_to_hub` (no recorded evaluation): task metadata (pipeline tag, tags,
    licence, base model when the model came from the Hub), usage through the model's pipeline, size and cost."""
    config, task = model.config, model.pipeline_task
    height, width = config.image_size
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(task),
        license="apache-2.0",
        tags=list(dict.fromkeys(["cmsa", "low-resolution", *([task] if task else []), "vision", *(tags or [])])),
        base_model=hub_base_model(config.name_or_path or None),
        model_name=repo_id.split("/")[-1],
    )
    return ModelCard.from_template(
        card_data,
        template_path=_template("pushed_model.md"),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        architecture=type(model).__name__,
        variant=config.variant.upper() if config.variant else "custom CMSA",
        image_height=height,
        image_width=width,
        task_name=TASK_NAMES.get(task),
        pipeline_task=task,
        box_input=task in BOX_PIPELINE_TASKS,
        **model_facts(model),
    )


def push_model_to_hub(
    model, repo_id: str, *, processor=None, card: ModelCard | None = None, commit_message: str | None = None,
    commit_description: str | None = None, private: bool | None = None, token=None, revision: str | None = None,
    create_pr: bool = False, max_shard_size="50GB", tags: list[str] | None = None,
) -> str:  # fmt: skip
    """`model.push_to_hub(repo_id)` for CMSA models: a repository that loads through its pipeline. It holds the
    weights and config (`save_pretrained`, with the remote code), the image processor (`processor`, default the
    config's `CMSAImageProcessor.for_config`) and a CMSA card (`card`, renamed for `repo_id`, default
    `pushed_model_card`). Returns the repository's URL."""
    from .image_processing_cmsa import CMSAImageProcessor  # noqa: PLC0415

    processor = processor if processor is not None else CMSAImageProcessor.for_config(model.config)
    card = card_for_repo(card, repo_id) if card is not None else pushed_model_card(model, repo_id, tags)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        processor.save_pretrained(folder)
        card.save(Path(folder) / "README.md")
        return push_folder_to_hub(
            folder, repo_id, token=token, private=private, revision=revision,
            commit_message=commit_message or "Upload CMSA model", commit_description=commit_description,
            create_pr=create_pr,
        )  # fmt: skip
