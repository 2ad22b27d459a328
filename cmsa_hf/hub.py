"""Hub-ready folders: model cards holding the measured results, the reparameterized copy, and publishing."""

import copy
import json
from pathlib import Path

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch.utils.flop_counter import FlopCounterMode


MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"
REPARAMETERIZED_SUBFOLDER = "reparameterized"
# Never uploaded: resumable training states and tracker logs.
UPLOAD_IGNORE_PATTERNS = ["checkpoints/**", "runs/**", "*.tmp", "**/*.tmp/**"]


def count_flops(model: torch.nn.Module) -> int:
    """FLOPs of one forward pass on one image of the model's input size (`torch.utils.flop_counter`)."""
    config = model.config
    pixels = torch.zeros(1, config.num_channels, *config.image_size, device=model.device, dtype=model.dtype)
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
        raise FileNotFoundError(f"Model card template {path} not found (templates live in the repository's model_cards/)")
    return str(path)


def image_classification_card(
    model,
    results: dict,
    *,
    dataset_name: str,
    dataset_description: str,
    eval_split_description: str,
    hyperparameters: dict,
    repo_id: str,
    base_model: str | None = None,
    has_reparameterized: bool = False,
) -> ModelCard:
    """The card of a trained classifier; every number comes from `results` (all_results.json) or the model."""
    config = model.config
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license="apache-2.0",
        tags=["cmsa", "low-resolution", "image-classification", "vision"],
        datasets=[dataset_name],
        metrics=["accuracy"],
        base_model=base_model,
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split="validation",
                metric_type="accuracy",
                metric_name="top-1 accuracy",
                metric_value=results["eval_accuracy"],
            )
        ],
    )
    height, width = config.image_size
    return ModelCard.from_template(
        card_data,
        template_path=_template("image_classification.md"),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        variant=config.variant.upper() if config.variant else "custom CMSA",
        image_height=height,
        image_width=width,
        num_labels=config.num_labels,
        label_names=", ".join(config.id2label[i] for i in range(config.num_labels)),
        dataset_description=dataset_description,
        eval_split_description=eval_split_description,
        train_samples=results["train_samples"],
        eval_samples=results["eval_samples"],
        initialisation=f"the checkpoint `{base_model}`" if base_model else "scratch (random initialisation)",
        hyperparameters=hyperparameters,
        results=results,
        has_reparameterized=has_reparameterized,
        **model_facts(model),
    )


def write_hub_folder(output_dir, model, processor, results: dict, card: ModelCard, reparameterize: bool = False):
    """Save weights (safetensors), config, processor, `all_results.json` and the card; optionally a folded copy."""
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
    card.save(output_dir / "README.md")
    if reparameterize:
        folded_dir = output_dir / REPARAMETERIZED_SUBFOLDER
        copy.deepcopy(model).reparameterize().save_pretrained(folded_dir)
        processor.save_pretrained(folded_dir)


def push_folder_to_hub(
    folder, repo_id: str, token: str | None = None, private: bool = False, revision: str | None = None,
    commit_message: str = "Upload CMSA model trained with cmsa_hf",
) -> str:  # fmt: skip
    """Create the model repository if needed and upload the folder (without checkpoints and logs)."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS,
    )
    return str(url)
