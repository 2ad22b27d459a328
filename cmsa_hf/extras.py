"""The optional dependencies of cmsa_hf (the extras of `pip install 'cmsa_hf[...]'`) and the check a command makes
before it starts work, so that a missing one stops it at once with the extra to install, not minutes later with an
ImportError."""

import importlib


EXTRAS = {
    "train": {
        "accelerate": "accelerate",
        "datasets": "datasets",
        "evaluate": "evaluate",
        "scikit-learn": "sklearn",
        "tensorboard": "tensorboard",
    },
    "pose": {"pycocotools": "pycocotools.cocoeval"},
    "headpose": {"scipy": "scipy.io"},
    "space": {"gradio": "gradio"},
    "onnx": {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"},
}
"""Each extra's distributions (as setup.cfg names them) and the module of each that cmsa_hf imports."""


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra that installs it."""


def missing_modules(extra: str) -> dict[str, str]:
    """The distributions of `extra` whose module does not import, each with the import error's message."""
    if extra not in EXTRAS:
        raise ValueError(f"cmsa_hf has no extra {extra!r}; its extras are {', '.join(EXTRAS)}")
    missing = {}
    for distribution, module in EXTRAS[extra].items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            missing[distribution] = str(error)
    return missing


def require_extras(*extras: str, needed_by: str) -> None:
    """Raise `MissingExtraError` unless every module of `extras` imports; `needed_by` names what needs them."""
    missing = {extra: problems for extra in extras if (problems := missing_modules(extra))}
    if missing:
        found = "; ".join(f"{name} ({message})" for problems in missing.values() for name, message in problems.items())
        raise MissingExtraError(
            f"{needed_by} needs the {', '.join(f'`{extra}`' for extra in missing)} extra of cmsa_hf, which is not "
            f"installed: {found}. Install it with: pip install 'cmsa_hf[{','.join(missing)}]'"
        )
