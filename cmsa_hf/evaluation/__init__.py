"""The metrics of `cmsa_hf.metrics` as Hugging Face `evaluate` modules shipped inside the package.

Each module is a script `cmsa_hf/evaluation/<name>/<name>.py` that wraps the pure functions of `cmsa_hf.metrics`
(the one implementation): `load(name, **init_kwargs)` is `evaluate.load(metric_path(name), **init_kwargs)`. A local
script path never reaches the Hub, so the modules load offline; `evaluate.load("<name>")` by bare name would look on
the Hub instead.
"""

from pathlib import Path

import numpy as np


EVALUATION_DIR = Path(__file__).resolve().parent


def list_metrics() -> list[str]:
    """Names of the shipped metric modules, e.g. ["cmsa_accuracy", "cmsa_coco_keypoints", ...]."""
    return sorted(path.parent.name for path in EVALUATION_DIR.glob("*/*.py") if path.stem == path.parent.name)


def metric_path(name: str) -> str:
    """The script of the shipped metric module `name`, as `evaluate.load` takes it."""
    if name not in list_metrics():
        raise ValueError(f"No metric module {name!r} in cmsa_hf; the shipped ones are {list_metrics()}")
    return str(EVALUATION_DIR / name / f"{name}.py")


def load(name: str, **init_kwargs):
    """`evaluate.load` of the shipped metric module `name`; `init_kwargs` go to `evaluate.load` (e.g. `cache_dir`,
    `keep_in_memory`, `num_process` / `process_id`, and the module's own, such as `annotation_file`)."""
    import evaluate  # the `train` extra

    return evaluate.load(metric_path(name), **init_kwargs)


def metric_info(description: str, citation: str, inputs_description: str, features: dict, **links):
    """The `evaluate.MetricInfo` of a shipped module: its texts, its input columns (name -> `datasets` feature) and
    `homepage` / `codebase_urls` / `reference_urls`."""
    import datasets
    import evaluate

    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description,
        features=datasets.Features(features),
        **links,
    )


def stacked(rows, name: str, dtype=np.float64) -> np.ndarray:
    """An evaluate input column (a list of per-sample rows) as one array; ragged rows are an error naming `name`."""
    try:
        return np.asarray(rows, dtype=dtype)
    except ValueError:
        shapes = sorted({np.shape(row) for row in rows})
        raise ValueError(f"Every {name} row needs the same shape, got rows of shapes {shapes[:5]}") from None
