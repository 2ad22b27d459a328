"""Convert a checkpoint of the authors' code (github.com/xyongLu/CMSA, `models/cmasformer.py`, `CMSAFormer_*_32`) into
a Hub-ready cmsa_hf folder:

    cmsa-hf convert models/cmsa_l_32x24.pth --variant cmsa-l --image-size 32 24 --output-dir cmsa-l-coco-32x24

Both forms of their checkpoints load: the training form (multi-branch `rbr_conv` / `rbr_scale` / `rbr_skip`
convolutions) and the output of their `reparameterize_model` (one `reparam_conv` per reparameterizable convolution;
converted into cmsa_hf's fully reparameterized, inference-only form). Every tensor is mapped and loaded with
`strict=True`; a checkpoint of another variant, or one that is not theirs, is an error naming the first tensor that
does not fit.
"""

import functools
import hashlib
import itertools
import re
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from .configuration_cmsa import VARIANTS, CMSAConfig
from .hub import _template, model_facts, push_folder_to_hub
from .image_processing_cmsa import CMSAImageProcessor
from .modeling_cmsa import CMSAForKeypointDetection


AUTHORS_REPOSITORY = "https://github.com/xyongLu/CMSA"
# Their tensors that have no counterpart: the stem registered a second time (`stem` is also `embedding_blocks.0`)
# and the fusion's BatchNorm of stage 1, which their forward never uses.
DROPPED_PREFIXES = ("stem.", "fgmm.norm0.")
# Inside a reparameterizable convolution: their branch names -> ours.
REPARAM_LEAVES = {
    "rbr_conv.0.conv.": "conv.conv.",
    "rbr_conv.0.bn.": "conv.bn.",
    "rbr_scale.conv.": "scale.conv.",
    "rbr_scale.bn.": "scale.bn.",
    "rbr_skip.": "identity.",
    "reparam_conv.": "reparam_conv.",
}


class ConversionError(ValueError):
    """The checkpoint does not fit the requested cmsa_hf architecture (the message names the first tensor)."""


def load_original_state_dict(path) -> dict[str, torch.Tensor]:
    """The authors' tensors from a `.pth` file: a bare state dict or one under "model" / "state_dict"; DDP's
    `module.` prefix removed. Loaded with `weights_only=True`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ConversionError(f"{path} holds no state dict (a dict of tensors, bare or under 'model' / 'state_dict')")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def module_pairs(config: CMSAConfig) -> list[tuple[str, str, str]]:
    """(their module prefix, our module prefix, kind) for every module of `CMSAForKeypointDetection(config)`.

    Kinds: "reparam" (their ReparamBlock, our CMSAReparamConv), "qkv" (their separate q and kv convolutions, our
    fused projection), "linear" (their nn.Linear output projection, our 1x1 convolution), "bias" (attention-bias
    tables, columns reordered), "same" (identical leaves: Conv2d_BN, BatchNorm, LayerNorm, Linear, ConvTranspose2d).
    """
    pairs = []
    embeddings = [("embedding_blocks.0.embedding1", "cmsa.stages.0.embedding.first")]
    embeddings += [("embedding_blocks.0.embedding2", "cmsa.stages.0.embedding.second")]
    embeddings += [(f"embedding_blocks.{i}", f"cmsa.stages.{i}.embedding") for i in range(1, config.num_stages)]
    for theirs, ours in embeddings:
        pairs += [(f"{theirs}.rep_dwconv", f"{ours}.depthwise", "reparam")]
        pairs += [(f"{theirs}.rep_pwconv", f"{ours}.pointwise", "reparam")]
    for stage, depth in enumerate(config.depths):
        groups = len(config.num_heads[stage])
        for block in range(depth):
            theirs, ours = f"stage_blocks.{stage}.trains_block{block}", f"cmsa.stages.{stage}.blocks.{block}"
            pairs += [
                (f"{theirs}.pos_embed", f"{ours}.position_encoding", "reparam"),
                (f"{theirs}.norm1", f"{ours}.attention_norm", "same"),
                (f"{theirs}.attn", f"{ours}.attention.qkv", "qkv"),
                (f"{theirs}.attn.linear", f"{ours}.attention.proj", "linear"),
                (f"{theirs}.norm2", f"{ours}.mlp_norm", "same"),
                (f"{theirs}.mlp", f"{ours}.mlp", "same"),
            ]
            theirs, ours = f"{theirs}.attn", f"{ours}.attention"
            for group in range(groups):
                fusion, our_fusion = f"{theirs}.spatial_fusion_modules.{group}", f"{ours}.spatial_fusions.{group}"
                pairs += [
                    (f"{theirs}.attn_modules.{group}", f"{ours}.attentions.{group}", "bias"),
                    (f"{fusion}.dwconv_bn", f"{our_fusion}.depthwise", "same"),
                    (f"{fusion}.pwconv_bn", f"{our_fusion}.pointwise", "same"),
                ]
                if group > 0:
                    pairs += [(f"{theirs}.channel_fusion_modules.{group - 1}", f"{ours}.channel_fusions.{group - 1}", "same")]
    for stage in range(1, config.num_stages):
        pairs += [
            (f"fgmm.convTrans{stage}", f"cmsa.fusion.upsamplers.{stage - 1}.conv", "same"),
            (f"fgmm.norm{stage}", f"cmsa.fusion.upsamplers.{stage - 1}.bn", "same"),
        ]
    pairs += [("fgmm.csMixer.0", "head.neck.projection", "same"), ("fgmm.csMixer.2", "head.heatmaps", "same")]
    return pairs


@functools.lru_cache(maxsize=None)
def original_bias_columns(window: tuple[int, int], kv_window: tuple[int, int]) -> torch.Tensor:
    """For each of our bias columns (offset |dy| * window width + |dx|), the authors' column of the same offset.

    They number the offsets in the order in which each first appears when scanning query positions, then key /
    value positions (row-major), which differs from ours whenever keys / values are pooled."""
    order = {}
    for query_y, query_x in itertools.product(range(window[0]), range(window[1])):
        for key_y, key_x in itertools.product(range(kv_window[0]), range(kv_window[1])):
            order.setdefault((abs(query_y - key_y), abs(query_x - key_x)), len(order))
    return torch.tensor([order[(dy, dx)] for dy in range(window[0]) for dx in range(window[1])])


def _leaf(kind: str, leaf: str) -> str | None:
    """Our name for the tensor `leaf` (their name inside a module of `kind`), None if it has none."""
    if kind == "reparam":
        return next((o + leaf[len(t) :] for t, o in REPARAM_LEAVES.items() if leaf.startswith(t)), None)
    if kind == "linear":
        return leaf if leaf in ("weight", "bias") else None
    if kind == "bias":
        return {"attention_biases": "attention_bias", "attention_bias_idxs": "attention_bias_idxs"}.get(leaf)
    return leaf


def _find_pair(key: str, pairs) -> tuple[str, str, str, str] | None:
    """(their prefix, our prefix, kind, leaf) of the most specific module that `key` belongs to."""
    best = None
    for theirs, ours, kind in pairs:
        if key.startswith(theirs + ".") and (best is None or len(theirs) > len(best[0])):
            best = (theirs, ours, kind, key[len(theirs) + 1 :])
    if best is not None and best[2] == "qkv" and not re.fullmatch(r"(q|kv)\.(weight|bias)", best[3]):
        return None
    return best


def _folded_modules(state: dict, pairs) -> set[str]:
    """Our prefixes of the reparameterizable convolutions that the checkpoint holds folded (`reparam_conv`)."""
    return {ours for theirs, ours, kind in pairs if kind == "reparam" and f"{theirs}.reparam_conv.weight" in state}


def convert_state_dict(state: dict[str, torch.Tensor], config: CMSAConfig) -> CMSAForKeypointDetection:
    """Build `CMSAForKeypointDetection(config)` and load the authors' tensors into it with `strict=True`.

    Raises a ConversionError naming the first tensor of the checkpoint that has no counterpart or the wrong shape,
    or the first one the model needs that the checkpoint lacks. A checkpoint in the authors' folded form gives a
    reparameterized (inference-only) model. The model takes the checkpoint's widest floating-point dtype (the
    remaining conv + BN folds then happen in it)."""
    pairs = module_pairs(config)
    floating = (tensor.dtype for tensor in state.values() if tensor.is_floating_point())
    dtype = functools.reduce(torch.promote_types, floating, torch.float32)
    model = CMSAForKeypointDetection(config).to(dtype)
    folded = _folded_modules(state, pairs)
    modules = dict(model.named_modules())
    for prefix in folded:
        modules[prefix].reparameterize()  # the folded shell; its weights come from the checkpoint below
    expected = model.state_dict()
    converted, sources = {}, {}

    def put(our_key: str, tensor: torch.Tensor, their_key: str):
        if our_key not in expected:
            raise ConversionError(f"unexpected tensor {their_key}: the {_describe(config)} model has no {our_key}")
        if tuple(tensor.shape) != tuple(expected[our_key].shape):
            raise ConversionError(
                f"tensor {their_key} has shape {tuple(tensor.shape)} where {_describe(config)} needs "
                f"{tuple(expected[our_key].shape)} ({our_key})"
            )
        converted[our_key], sources[our_key] = tensor, their_key

    for key, tensor in state.items():
        if key.startswith(DROPPED_PREFIXES):
            continue
        found = _find_pair(key, pairs)
        leaf = _leaf(found[2], found[3]) if found else None
        if leaf is None:
            raise ConversionError(
                f"unexpected tensor {key}: not a tensor of the authors' CMSAFormer ({_describe(config)}); is this a "
                f"checkpoint of {AUTHORS_REPOSITORY}?"
            )
        theirs, ours, kind, their_leaf = found
        if kind == "qkv":
            part, name = their_leaf.split(".")
            if part == "kv":
                continue  # fused with q below
            other = f"{theirs}.kv.{name}"
            if other not in state:
                raise ConversionError(f"missing tensor {other} (fused with {key} into {ours}.{name})")
            put(f"{ours}.{name}", torch.cat([tensor, state[other]]), f"{key} + {other}")
        elif kind == "linear":
            put(f"{ours}.{leaf}", tensor[..., None, None] if leaf == "weight" else tensor, key)
        elif kind == "bias":
            attention = modules[ours]
            columns = original_bias_columns(attention.window_size, attention.kv_window_size)
            if leaf == "attention_bias_idxs":  # their cached index: check that it describes the same windows
                if tuple(tensor.shape) != tuple(attention.attention_bias_index.shape) or not torch.equal(
                    tensor, columns[attention.attention_bias_index]
                ):
                    raise ConversionError(
                        f"tensor {key} does not index the windows {attention.window_size} (keys / values "
                        f"{attention.kv_window_size}) of {_describe(config)}: the checkpoint has other windows"
                    )
                continue
            if tensor.shape[-1] != columns.numel():
                put(f"{ours}.{leaf}", tensor, key)  # raises the shape error
            put(f"{ours}.{leaf}", tensor[:, columns], key)
        else:
            put(f"{ours}.{leaf}", tensor, key)

    missing = [key for key in expected if key not in converted]
    if missing:
        their_name = _original_name(missing[0], pairs)
        raise ConversionError(f"missing tensor {their_name} ({missing[0]} of {_describe(config)})")
    model.load_state_dict(converted, strict=True)
    if folded:
        model.reparameterize()  # the rest (conv + BN pairs) folds exactly as cmsa_hf's own inference form
    return model.eval()


def _original_name(our_key: str, pairs) -> str:
    """The authors' name of one of our tensors (for error messages)."""
    for theirs, ours, kind in sorted(pairs, key=lambda pair: -len(pair[1])):
        if our_key.startswith(ours + "."):
            leaf = our_key[len(ours) + 1 :]
            if kind == "reparam":
                leaf = next((t + leaf[len(o) :] for t, o in REPARAM_LEAVES.items() if leaf.startswith(o)), leaf)
            elif kind == "qkv":
                return f"{theirs}.q.{leaf} / {theirs}.kv.{leaf}"
            elif kind == "bias":
                leaf = "attention_biases"
            return f"{theirs}.{leaf}"
    return our_key


def _describe(config: CMSAConfig) -> str:
    height, width = config.image_size
    return f"{config.variant or 'custom CMSA'} at {height}x{width}"


def original_config(variant: str, image_size=(32, 24)) -> CMSAConfig:
    """The cmsa_hf config of the authors' `CMSAFormer_<variant>_32`: their fixed windows and stride-1 stem at any
    input size, COCO's 17 keypoints."""
    return CMSAConfig.from_variant(variant, image_size=tuple(image_size), window_layout="fixed", stem_stride=1)


def convert(state: dict[str, torch.Tensor], variant: str | None = None, image_size=(32, 24)):
    """The authors' tensors as a cmsa_hf model; the variant is read from the tensor shapes when not given."""
    if variant is not None:
        try:
            return convert_state_dict(state, original_config(variant, image_size))
        except ConversionError as error:
            detected = detect_variant(state, image_size, skip=variant)
            hint = f"; its tensors are those of {detected} (pass --variant {detected})" if detected else ""
            raise ConversionError(f"The checkpoint is not a {variant} checkpoint: {error}{hint}") from None
    problems = []
    for name in VARIANTS:
        try:
            return convert_state_dict(state, original_config(name, image_size))
        except ConversionError as error:
            problems.append(f"{name}: {error}")
    raise ConversionError("The checkpoint matches no CMSA variant:\n  " + "\n  ".join(problems))


def detect_variant(state: dict[str, torch.Tensor], image_size=(32, 24), skip: str | None = None) -> str | None:
    """The preset whose tensors the checkpoint holds, None if none."""
    for name in VARIANTS:
        if name != skip:
            try:
                convert_state_dict(state, original_config(name, image_size))
                return name
            except ConversionError:
                continue
    return None


def converted_card(model, *, checkpoint: Path, sha256: str, repo_id: str, folded: bool) -> ModelCard:
    """The card of a converted checkpoint: where the weights came from, how they were checked, size and cost."""
    config = model.config
    height, width = config.image_size
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="keypoint-detection",
        license="mit",
        tags=["cmsa", "low-resolution", "keypoint-detection", "human-pose-estimation", "vision"],
        model_name=repo_id.split("/")[-1],
    )
    return ModelCard.from_template(
        card_data,
        template_path=_template("converted_keypoint_detection.md"),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        variant=config.variant.upper(),
        image_height=height,
        image_width=width,
        checkpoint_name=checkpoint.name,
        sha256=sha256,
        authors_repository=AUTHORS_REPOSITORY,
        folded=folded,
        num_keypoints=config.num_keypoints,
        heatmap_size="x".join(map(str, config.stage_resolutions()[0])),
        **model_facts(model),
    )


def convert_checkpoint(
    checkpoint, output_dir, variant: str | None = None, image_size=(32, 24), push_to_hub=None, token=None, private=False
):
    """Convert the authors' `.pth` file into a Hub-ready folder (safetensors, config, processor, card); upload it
    to the `push_to_hub` repository when given. Returns the model."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    state = load_original_state_dict(checkpoint)
    model = convert(state, variant, image_size)
    folded = bool(model.config.reparameterized)
    processor = CMSAImageProcessor.for_config(model.config, keypoint_names=model.config.keypoint_names)
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    repo_id = push_to_hub or output_dir.name
    card = converted_card(model, checkpoint=checkpoint, sha256=sha256, repo_id=repo_id, folded=folded)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    card.save(output_dir / "README.md")
    if push_to_hub:
        message = f"Convert {checkpoint.name} from {AUTHORS_REPOSITORY}"
        push_folder_to_hub(output_dir, push_to_hub, token=token, private=private, commit_message=message)
    return model


def add_convert_command(commands):
    """The `cmsa-hf convert` subcommand (see the module docstring)."""
    command = commands.add_parser("convert", help="Convert a checkpoint of the authors' code into a Hub-ready folder.")
    command.add_argument("checkpoint", help="The authors' .pth file (training or reparameterized form).")
    command.add_argument("--variant", choices=list(VARIANTS), default=None, help="Default: read from the shapes.")
    command.add_argument("--image-size", type=int, nargs=2, default=(32, 24), metavar=("H", "W"), help="Default 32 24.")
    command.add_argument("--output-dir", required=True)
    command.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="Also upload the folder (you/name).")
    command.add_argument("--private", action="store_true")
    command.add_argument("--token", default=None)
    command.set_defaults(run=run_convert_command)


def run_convert_command(args):
    model = convert_checkpoint(
        args.checkpoint, args.output_dir, args.variant, args.image_size, args.push_to_hub, args.token, args.private
    )
    form = "reparameterized" if model.config.reparameterized else "multi-branch"
    print(f"Converted {args.checkpoint} ({model.config.variant}, {form}) into {args.output_dir}")
    if args.push_to_hub:
        print(f"Uploaded to {args.push_to_hub}")


__all__ = ["convert", "convert_checkpoint", "convert_state_dict", "load_original_state_dict", "ConversionError"]
