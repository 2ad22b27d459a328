"""Inference speed of CMSA: its fast paths against plain eager, and CMSA against peers built from transformers.

    python benchmarks/inference.py --threads 2 --output_dir benchmarks/results          # what the README shows
    python benchmarks/inference.py --device cuda --output_dir benchmarks/results-cuda   # on a GPU

For each input size (32x24 and 64x48: CMSAForKeypointDetection; 32x32: CMSAForImageClassification, 100 labels):
CMSA S / B / L on their inference paths, at the pose sizes the authors' released structure of each variant
(`authors_structure.py`: their layout, per-window Python loops, no reparameterization; every CMSA row gets its ratio
to it, `vs authors`), and peers with random weights at the same input size: ViTPose-B (the
paper's peer, VitPoseForPoseEstimation with its default ViT-B backbone), Swin-T, ResNet-50 and LeViT-128S.
Every model at one input size is timed interleaved (round-robin over the models, `--repeats` rounds, after
warm-up), so a slow spell of a noisy machine hits all of them alike; the figures are medians over the rounds.

Measured per model: parameters; FLOPs of one image (torch.utils.flop_counter); latency at batch 1; throughput at
`--batch_size` (64); the growth of peak resident memory (CPU: VmHWM, reset before the batch) or peak allocated
memory (CUDA) during one batch; achieved GFLOP/s and its fraction of the machine's dense fp32 matmul GFLOP/s
(a large torch.mm on the same threads). Output: results.json, results.md and throughput_vs_parameters.png.
"""

import argparse
import copy
import ctypes
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config
from transformers import (
    LevitConfig,
    LevitModel,
    ResNetConfig,
    ResNetModel,
    SwinConfig,
    SwinModel,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
)

from cmsa_hf import CMSAConfig, CMSAForImageClassification, CMSAForKeypointDetection
from cmsa_hf.hub import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from authors_structure import AuthorsStructureCMSA  # noqa: E402

INPUT_SIZES = [(32, 24), (64, 48), (32, 32)]
VARIANTS = ["cmsa-s", "cmsa-b", "cmsa-l"]
BASELINE_PATH = "eager multi-branch"
AUTHORS_PATH = "authors' structure (eager)"


# --------------------------------------------------------------------------------------------------- models


@dataclass
class Candidate:
    """One model on one inference path, ready to time: `run(batch_size)` does one forward pass."""

    name: str
    path: str
    family: str  # "cmsa", "authors" (their structure of a CMSA variant) or "peer"
    parameters: int
    flops_per_image: int
    input_size: tuple[int, int]
    note: str = ""
    runner: object = field(default=None, repr=False)

    def run(self, batch_size: int):
        return self.runner(batch_size)


def torch_runner(model, input_size, device, channels_last=False, autocast_dtype=None):
    """A function of the batch size that runs `model` on a cached random batch."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).eval()
    inputs = {}

    @torch.inference_mode()
    def run(batch_size):
        if batch_size not in inputs:
            inputs[batch_size] = torch.randn(batch_size, 3, *input_size, device=device).contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(pixel_values=inputs[batch_size])

    return run


def onnx_runtime_runner(model, input_size, threads):
    """The reparameterized model exported with `cmsa_hf.export.export_onnx`, run by ONNX Runtime on the CPU."""
    import onnxruntime

    from cmsa_hf.export import export_onnx

    path = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Idle ONNX Runtime threads otherwise spin for a while after each run, stealing the cores from whichever model
    # is timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without its arena, ONNX Runtime returns each run's buffers (several GB at 64x48, batch 64) instead of keeping
    # them for the rest of the benchmark.
    options.enable_cpu_mem_arena = False
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {}

    def run(batch_size):
        if batch_size not in inputs:
            inputs[batch_size] = np.random.default_rng(0).standard_normal((batch_size, 3, *input_size), dtype=np.float32)
        return session.run(None, {"pixel_values": inputs[batch_size]})

    return run


# The PyTorch inference paths of CMSA: (reparameterized, attention implementation (None: the default; the compiled
# path takes --compile_attention), channels_last, autocast dtype, torch.compile).
TORCH_PATHS = {
    BASELINE_PATH: (False, None, False, None, False),
    "eager multi-branch, softmax attention": (False, "eager", False, None, False),
    "reparameterized": (True, None, False, None, False),
    "reparameterized + channels_last": (True, None, True, None, False),
    "reparameterized + channels_last + softmax attention": (True, "eager", True, None, False),
    "reparameterized + channels_last + compile": (True, None, True, None, True),
    "reparameterized + bf16 autocast": (True, None, True, torch.bfloat16, False),
    "reparameterized + fp16 autocast": (True, None, True, torch.float16, False),
}
ONNX_PATH = "ONNX Runtime"
ALL_PATHS = [*TORCH_PATHS, ONNX_PATH]


def cmsa_candidates(variant, input_size, args, device) -> list[Candidate]:
    """CMSA `variant` on every inference path `args.paths` asks for (the model class follows the input size)."""
    model_class = CMSAForImageClassification if input_size[0] == input_size[1] else CMSAForKeypointDetection
    torch.manual_seed(0)
    multi_branch = model_class(CMSAConfig.from_variant(variant, image_size=input_size, num_labels=100)).eval()
    _calibrate_batch_norms(multi_branch, input_size)
    reparameterized = copy.deepcopy(multi_branch).reparameterize()
    flops = {model: count_flops(model) for model in (multi_branch, reparameterized)}  # modules hash by identity
    name = f"CMSA-{variant[-1].upper()}"

    candidates = []
    for path in args.paths:
        if variant not in args.all_paths_variants and path not in args.variant_paths:
            continue
        if path == ONNX_PATH:
            if device.type != "cpu":
                continue
            model, runner = reparameterized, onnx_runtime_runner(multi_branch, input_size, args.threads)
        else:
            folded, attention, channels_last, autocast_dtype, compiled = TORCH_PATHS[path]
            if autocast_dtype is not None and device.type != "cuda":
                continue
            model = reparameterized if folded else multi_branch
            copied = copy.deepcopy(model)
            attention = args.compile_attention if compiled else attention
            if attention is not None:  # every module reads the (copied) shared config
                copied.config._attn_implementation = attention
            runner = torch_runner(torch.compile(copied) if compiled else copied, input_size, device, channels_last, autocast_dtype)
        candidates.append(Candidate(name, path, "cmsa", model.num_parameters(), flops[model], input_size, runner=runner))
    if model_class is CMSAForKeypointDetection and multi_branch.config.stem_stride == 1:
        candidates.append(authors_candidate(name, multi_branch.config, device))
    return candidates


def authors_candidate(name, config, device) -> Candidate:
    """The authors' structure of `config`'s variant (17 heatmaps), eager fp32 NCHW, BatchNorms calibrated alike."""
    torch.manual_seed(0)
    model = AuthorsStructureCMSA.from_config(config, num_outputs=config.num_labels).eval()
    _calibrate_batch_norms(model, config.image_size)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, *config.image_size))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    runner = torch_runner(model, config.image_size, device)
    return Candidate(name, AUTHORS_PATH, "authors", parameters, counter.get_total_flops(), tuple(config.image_size), runner=runner)


def _calibrate_batch_norms(model, input_size):
    """Running statistics from a few random batches (an untrained net with unit statistics overflows float32
    in its attention logits, which would time a different softmax workload than a trained model's)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(pixel_values=torch.randn(16, 3, *input_size))
    model.eval()


def peer_candidates(input_size, device) -> list[Candidate]:
    """Peers from transformers with random weights, built for `input_size` (plain eager, NCHW, fp32)."""
    side = max(input_size)
    peers = [
        ("ViTPose-B", VitPoseForPoseEstimation(VitPoseConfig(backbone_config=VitPoseBackboneConfig(image_size=list(input_size)))),
         input_size, "ViT-B/16 backbone + classic decoder"),
        # transformers' Swin fails on stage maps smaller than its window: 2x2 windows and a patch size of side / 16
        # keep four stages on these inputs.
        ("Swin-T", SwinModel._from_config(SwinConfig(image_size=side, patch_size=max(side // 16, 1), window_size=2)),
         input_size, f"patch {max(side // 16, 1)}, window 2"),
        ("ResNet-50", ResNetModel(ResNetConfig()), input_size, ""),
        # LeViT's attention biases assume a square map: it runs on the square of the longer side.
        ("LeViT-128S", LevitModel(LevitConfig(image_size=side)), (side, side), f"square {side}x{side} input"),
    ]
    candidates = []
    for name, model, size, note in peers:
        model.eval()
        candidates.append(
            Candidate(name, "eager", "peer", model.num_parameters(), count_flops(model, size), size, note,
                      runner=torch_runner(model, size, device))
        )  # fmt: skip
    return candidates


# --------------------------------------------------------------------------------------------------- timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(candidates, batch_size, repeats, calls, device) -> list[list[float]]:
    """Seconds per call of each candidate: `repeats` rounds, each round times every candidate once in turn
    (the mean of `calls` back-to-back calls)."""
    times = [[] for _ in candidates]
    for _ in range(repeats):
        for index, candidate in enumerate(candidates):
            synchronize(device)
            started = time.perf_counter()
            for _ in range(calls):
                candidate.run(batch_size)
            synchronize(device)
            times[index].append((time.perf_counter() - started) / calls)
    return times


_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory_mib(candidate, batch_size, device) -> float | None:
    """Memory one batch adds at its peak: CUDA peak allocated bytes, or on Linux the growth of the resident set's
    high-water mark (reset through /proc/self/clear_refs, after returning freed heap to the system)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        candidate.run(batch_size)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if _LIBC is None:
        return None
    _LIBC.malloc_trim(0)
    before = _proc_status_mib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    candidate.run(batch_size)
    return _proc_status_mib("VmHWM:") - before


def matmul_gflops(device, size=4096, repeats=5) -> float:
    """Dense fp32 matmul throughput of this machine and thread count (median of `repeats`)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


# --------------------------------------------------------------------------------------------------- report


def measure(candidates, args, device, peak_gflops) -> list[dict]:
    for candidate in candidates:  # warm-up (and compilation)
        for batch_size in (1, args.batch_size):
            for _ in range(args.warmup):
                candidate.run(batch_size)
    latency = time_interleaved(candidates, 1, args.repeats, args.latency_calls, device)
    throughput = time_interleaved(candidates, args.batch_size, args.repeats, 1, device)
    rows = []
    for candidate, latencies, batch_times in zip(candidates, latency, throughput):
        images_per_second = args.batch_size / statistics.median(batch_times)
        achieved = candidate.flops_per_image * images_per_second / 1e9
        row = {key: value for key, value in asdict(candidate).items() if key != "runner"}
        row.update(
            latency_ms=1e3 * statistics.median(latencies),
            throughput=images_per_second,
            memory_mib=peak_memory_mib(candidate, args.batch_size, device),
            achieved_gflops=achieved,
            matmul_fraction=achieved / peak_gflops,
            batch_seconds=batch_times,
            latency_seconds=latencies,
        )
        rows.append(row)
    baselines = {row["name"]: row["throughput"] for row in rows if row["path"] == BASELINE_PATH}
    authors = {row["name"]: row["throughput"] for row in rows if row["family"] == "authors"}
    for row in rows:
        if row["family"] == "cmsa" and row["name"] in baselines:
            row["speedup_vs_eager"] = row["throughput"] / baselines[row["name"]]
        if row["family"] == "cmsa" and row["name"] in authors:
            row["speedup_vs_authors"] = row["throughput"] / authors[row["name"]]
    return rows


def markdown_table(rows, batch_size) -> str:
    lines = [
        f"| model | path | input | params (M) | GFLOPs / image | latency b=1 (ms) | throughput b={batch_size} "
        f"(img/s) | vs eager | vs authors | peak memory (MiB) | GFLOP/s | of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speedup = f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else ""
        versus_authors = f"{row['speedup_vs_authors']:.2f}x" if "speedup_vs_authors" in row else ""
        memory = f"{row['memory_mib']:.0f}" if row["memory_mib"] is not None else "n/a"
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(
            f"| {row['name']}{note} | {row['path']} | {row['input_size'][0]}x{row['input_size'][1]} | "
            f"{row['parameters'] / 1e6:.2f} | {row['flops_per_image'] / 1e9:.3f} | {row['latency_ms']:.1f} | "
            f"{row['throughput']:.1f} | {speedup} | {versus_authors} | {memory} | {row['achieved_gflops']:.1f} | "
            f"{100 * row['matmul_fraction']:.0f}% |"
        )
    return "\n".join(lines)


def summary_table(rows, batch_size) -> str:
    """The README's view of the rows: per input size, each CMSA variant plain eager and on its fastest path (with
    its speed-up, and reparameterization's alone), then the peers."""
    lines = [
        f"| input | model | path | params (M) | GFLOPs / image | latency b=1 (ms) | throughput b={batch_size} (img/s) | "
        "speed-up (reparameterized alone) | vs authors' structure | GFLOP/s (of matmul) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in dict.fromkeys(tuple(row["group"]) for row in rows):
        group = [row for row in rows if tuple(row["group"]) == size]
        reparameterized = {row["name"]: row for row in group if row["path"] == "reparameterized"}
        for row in group:
            if row["family"] == "cmsa" and row["path"] != BASELINE_PATH and not row.get("fastest"):
                continue
            speedup = ""
            if row["family"] == "cmsa" and row["path"] != BASELINE_PATH:
                speedup = f"{row['speedup_vs_eager']:.2f}x"
                if row["name"] in reparameterized:
                    speedup += f" ({reparameterized[row['name']]['speedup_vs_eager']:.2f}x)"
            versus_authors = f"{row['speedup_vs_authors']:.2f}x" if "speedup_vs_authors" in row else ""
            name = row["name"] + (f" ({row['note']})" if row["note"] else "")
            lines.append(
                f"| {size[0]}x{size[1]} | {name} | {row['path']} | {row['parameters'] / 1e6:.2f} | "
                f"{row['flops_per_image'] / 1e9:.3f} | {row['latency_ms']:.1f} | {row['throughput']:.1f} | {speedup} | "
                f"{versus_authors} | "
                f"{row['achieved_gflops']:.0f} ({100 * row['matmul_fraction']:.0f}%) |"
            )
    return "\n".join(lines)


def write_outputs(results: dict, output_dir: Path):
    """results.json, results.md (every row), summary.md (the README's table) and the plot."""
    rows, machine, args = results["rows"], results["machine"], results["args"]
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    where = machine["cpu"] if args["device"] == "cpu" else f"{machine['device']}; host {machine['cpu']}"
    header = (
        f"{where} ({args['device']}), {machine['threads']} threads, torch {machine['torch']}; dense fp32 "
        f"matmul {machine['matmul_gflops']:.1f} GFLOP/s; batch {args['batch_size']}; medians of {args['repeats']} "
        "interleaved rounds.\n\n"
    )
    (output_dir / "results.md").write_text(header + markdown_table(rows, args["batch_size"]) + "\n")
    (output_dir / "summary.md").write_text(header + summary_table(rows, args["batch_size"]) + "\n")
    plot(rows, output_dir / "throughput_vs_parameters.png")


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(tuple(row["group"]) for row in rows))
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        chosen = [row for row in rows if tuple(row["group"]) == size]
        for row in chosen:
            fastest = row["family"] == "cmsa" and row.get("fastest")
            if row["family"] == "cmsa" and not fastest and row["path"] != BASELINE_PATH:
                continue
            marker, color = {"cmsa": ("o", "tab:blue"), "authors": ("^", "tab:green")}.get(row["family"], ("s", "tab:gray"))
            if row["family"] == "cmsa" and not fastest:
                color = "tab:orange"
            axis.scatter(row["parameters"] / 1e6, row["throughput"], marker=marker, color=color)
            label = row["name"] if row["family"] == "peer" or fastest else ""
            axis.annotate(label, (row["parameters"] / 1e6, row["throughput"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters (M)")
        axis.set_ylabel("images / s")
        axis.set_title(f"{size[0]}x{size[1]} input")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].scatter([], [], marker="o", color="tab:blue", label="CMSA, fastest path")
    axes[0][0].scatter([], [], marker="o", color="tab:orange", label="CMSA, eager multi-branch")
    axes[0][0].scatter([], [], marker="^", color="tab:green", label="CMSA, the authors' structure (eager)")
    axes[0][0].scatter([], [], marker="s", color="tab:gray", label="peer (eager)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) intra-op threads on CPU.")
    parser.add_argument("--input_sizes", type=str, nargs="+", default=[f"{h}x{w}" for h, w in INPUT_SIZES])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--paths", nargs="+", default=ALL_PATHS, choices=ALL_PATHS)
    parser.add_argument(
        "--all_paths_variants", nargs="+", default=["cmsa-b"], help="Variants timed on every path (the others on --variant_paths)."
    )
    parser.add_argument(
        "--variant_paths", nargs="+", default=[BASELINE_PATH, "reparameterized", "reparameterized + channels_last", ONNX_PATH]
    )
    parser.add_argument("--compile_attention", default="eager", choices=["eager", "sdpa"], help="Attention for the compiled path.")
    parser.add_argument("--no_peers", action="store_true")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved timing rounds (the median is reported).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--latency_calls", type=int, default=5, help="Batch-1 calls per round.")
    parser.add_argument("--output_dir", type=str, default="benchmarks/results")
    parser.add_argument("--from_json", type=str, default=None, help="Rewrite the tables and plot of a results.json.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if any("compile" in path for path in args.paths):
        # Inductor with frozen weights, which lets it prepack them and fuse convolutions and linears with their
        # activations (CPU inference).
        torch._inductor.config.freezing = True
    warnings.filterwarnings("ignore")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        write_outputs(json.loads(Path(args.from_json).read_text()), output_dir)
        return None

    peak = matmul_gflops(device)
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_gflops": peak,
    }
    print(f"{machine['cpu']}, {args.device}, {machine['threads']} threads, torch {torch.__version__}: "
          f"dense fp32 matmul {peak:.1f} GFLOP/s", flush=True)  # fmt: skip

    rows = []
    for text in args.input_sizes:
        size = tuple(int(side) for side in text.split("x"))
        candidates = [c for variant in args.variants for c in cmsa_candidates(variant, size, args, device)]
        if not args.no_peers:
            candidates += peer_candidates(size, device)
        started = time.perf_counter()
        group = measure(candidates, args, device, peak)
        for row in group:
            row["group"] = size
        _mark_fastest(group)
        rows += group
        del candidates  # free this size's models before building the next size's
        print(f"\n{text} ({time.perf_counter() - started:.0f} s)\n" + markdown_table(group, args.batch_size), flush=True)

    write_outputs({"machine": machine, "args": vars(args), "rows": rows}, output_dir)
    print(f"\nwrote {output_dir / 'results.json'}, results.md, summary.md, throughput_vs_parameters.png")
    return rows


def _mark_fastest(rows):
    """Flag each CMSA variant's fastest path at this input size."""
    best = {}
    for row in rows:
        if row["family"] == "cmsa" and row["throughput"] > best.get(row["name"], {"throughput": 0})["throughput"]:
            best[row["name"]] = row
    for row in best.values():
        row["fastest"] = True


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
