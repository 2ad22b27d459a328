"""One publishing path for every training script and the `cmsa-hf publish` command: check a Hub-ready folder,
optionally add the reparameterized inference copy, and upload it (or, with a dry run, say what would go up).

    cmsa-hf publish outputs/digits-cmsa-s --repo-id you/cmsa-s-digits [--private] [--revision main] [--dry-run]
    cmsa-hf convert CHECKPOINT.pth --variant cmsa-l --image-size 32 24 --output-dir DIR   (convert_cmsa_original_to_hf)
"""

import fnmatch
import json
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoImageProcessor

from . import modeling_cmsa
from .hub import (
    MODEL_INDEX_METRICS,
    REPARAMETERIZED_SUBFOLDER,
    UPLOAD_IGNORE_PATTERNS,
    card_for_repo,
    check_card_metadata,
    push_folder_to_hub,
    save_reparameterized_copy,
)


# all_results.json key of every model-index metric type the cards write.
RESULT_KEY_OF_METRIC = {
    metric_type: f"eval_{key}" for metrics in MODEL_INDEX_METRICS.values() for key, (metric_type, _) in metrics.items()
}


def validate_folder(folder) -> dict:
    """Load what a user will load and check the card against the run's results. Returns the card metadata.

    Raises a ValueError naming the problem: a missing file, weights or processor that do not load, card metadata the
    Hub would not read as meant (`check_card_metadata`), a card without a model-index for a folder with measured results, a model-index metric whose value is not the `all_results.json`
    value of the same metric (matched by metric type, e.g. `oks-ap50` to `eval_AP50`) or that names no result.
    """
    folder = Path(folder)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is not a Hub-ready folder: {name} is missing")
    load_model(folder)  # raises on corrupt or mismatched weights
    AutoImageProcessor.from_pretrained(folder)

    card = ModelCard.load(folder / "README.md")
    metadata = card.data.to_dict()
    check_card_metadata(metadata, folder / "README.md")
    results_file = folder / "all_results.json"
    results = json.loads(results_file.read_text())
    metrics = [
        metric
        for entry in metadata.get("model-index", [])
        for result in entry.get("results", [])
        for metric in result.get("metrics", [])
    ]
    measured = sorted(key for key in results if key.startswith("eval_"))
    if not metrics and measured:
        raise ValueError(
            f"{folder / 'README.md'} has no model-index: the card of a trained folder must report its measured "
            f"results ({', '.join(measured)} in {results_file})"
        )
    for metric in metrics:
        name, key = metric.get("name", metric.get("type")), RESULT_KEY_OF_METRIC.get(metric.get("type"))
        if key not in results:
            raise ValueError(
                f"The card's metric {name!r} (type {metric.get('type')!r}) matches no result of {results_file} "
                f"(known types: {', '.join(RESULT_KEY_OF_METRIC)})"
            )
        if metric.get("value") != results[key]:
            raise ValueError(
                f"The card's {name} = {metric.get('value')} is not a measured value: {results_file} has {key} = {results[key]}"
            )
    return metadata


def files_to_upload(folder) -> list[str]:
    """The folder's files that an upload sends (checkpoints and logs stay behind), relative paths, sorted."""
    folder = Path(folder)
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in UPLOAD_IGNORE_PATTERNS))


def add_reparameterized_copy(folder, output_dir=None) -> Path:
    """Write the folded inference copy of the folder's model into `output_dir/reparameterized` (default: `folder`)."""
    model, processor = load_model(folder), AutoImageProcessor.from_pretrained(folder)
    return save_reparameterized_copy(model, processor, output_dir if output_dir is not None else folder)


def load_model(folder):
    """The folder's model, as the cmsa_hf class its config names (`architectures`)."""
    architecture = (AutoConfig.from_pretrained(folder).architectures or ["CMSAModel"])[0]
    model_class = getattr(modeling_cmsa, architecture, None)
    if model_class is None:
        raise ValueError(f"{folder}/config.json names the architecture {architecture!r}, which cmsa_hf does not know")
    return model_class.from_pretrained(folder)


def publish(
    folder, repo_id: str, *, token=None, private: bool = False, revision=None, dry_run: bool = False,
    add_reparameterized: bool = False,
) -> dict:  # fmt: skip
    """Validate `folder`, optionally add the reparameterized copy, and upload it to `repo_id` (unless `dry_run`).
    Returns what was (or would be) uploaded: repo_id, files, card metadata, url. A dry run writes nothing into
    `folder`: the reparameterized copy is built in a scratch folder, to check that it folds and to list its files."""
    validate_folder(folder)
    files = files_to_upload(folder)
    if add_reparameterized and not (Path(folder) / REPARAMETERIZED_SUBFOLDER).is_dir():
        if dry_run:
            with tempfile.TemporaryDirectory() as scratch:
                add_reparameterized_copy(folder, scratch)
                files = sorted(files + files_to_upload(scratch))
        else:
            add_reparameterized_copy(folder)
            files = files_to_upload(folder)
    card = card_for_repo(ModelCard.load(Path(folder) / "README.md"), repo_id)
    summary = {"repo_id": repo_id, "files": files, "card": card.data.to_dict(), "url": None}
    summary["usage"] = [line for line in card.text.splitlines() if f'"{repo_id}"' in line]
    if not dry_run:
        card.save(Path(folder) / "README.md")  # the folder then says what the repository says
        summary["url"] = push_folder_to_hub(folder, repo_id, token=token, private=private, revision=revision)
    return summary
