"""The benchmark scripts run end to end (tiny settings; no timing is asserted)."""

import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA
from safetensors.torch import load_file

from cmsa_hf.convert_cmsa_original_to_hf import load_original_state_dict, original_config

AUTHORS_FIXTURE = SHARED_DATA / "authors-checkpoint"


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inference_benchmark_writes_json_table_and_plot(tmp_path):
    inference = load_script("inference")
    paths = [inference.BASELINE_PATH, "reparameterized", "reparameterized + channels_last"]
    inference.main(
        ["--input_sizes", "32x24", "--variants", "cmsa-s", "--all_paths_variants", "cmsa-s", "--paths", *paths,
         "--no_peers", "--batch_size", "2", "--repeats", "2", "--latency_calls", "1", "--threads", str(torch.get_num_threads()),
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [row["path"] for row in rows] == [*paths, inference.AUTHORS_PATH]
    authors = rows.pop()
    assert authors["family"] == "authors" and authors["throughput"] > 0 and "speedup_vs_eager" not in authors
    assert results["machine"]["matmul_gflops"] > 0 and results["machine"]["threads"] == torch.get_num_threads()
    for row in rows:
        assert len(row["batch_seconds"]) == 2 and row["throughput"] > 0 and row["flops_per_image"] > 0
        assert row["speedup_vs_eager"] > 0 and row["memory_mib"] is not None
        assert row["speedup_vs_authors"] == row["throughput"] / authors["throughput"]
    assert rows[0]["speedup_vs_eager"] == 1.0
    assert rows[1]["parameters"] < rows[0]["parameters"]  # the reparameterized form is smaller
    assert sum(row.get("fastest", False) for row in rows) == 1
    table = (tmp_path / "results.md").read_text()
    assert "| CMSA-S | reparameterized + channels_last | 32x24 |" in table
    assert f"| CMSA-S | {inference.AUTHORS_PATH} | 32x24 |" in table
    assert (tmp_path / "throughput_vs_parameters.png").stat().st_size > 0


def test_model_stats_reproduces_the_papers_parameter_counts():
    """Table 2 (pose, 32x24) and Table 3 (head-pose backbone) to the digit, counted as the authors' script does."""
    from cmsa_hf import CMSAConfig, CMSAForKeypointDetection, CMSAModel

    model_stats = load_script("model_stats")
    for model_class, paper in ((CMSAForKeypointDetection, (4.1, 5.6, 7.3)), (CMSAModel, (4.0, 5.4, 7.1))):
        for variant, millions in zip(model_stats.VARIANTS, paper):
            model = model_class(CMSAConfig.from_variant(variant))
            counted = model_stats.paper_parameter_count(model)
            assert counted < model.num_parameters() and round(counted / 1e6, 1) == millions, (variant, counted)


@pytest.mark.skipif(not AUTHORS_FIXTURE.is_dir(), reason=f"{AUTHORS_FIXTURE} (../shared) is absent")
def test_authors_structure_loads_their_checkpoint_and_reproduces_their_heatmaps():
    """The benchmark's peer is their network: their tensors load with strict=True and give their outputs."""
    fixture = AUTHORS_FIXTURE
    authors_structure = load_script("authors_structure")
    model = authors_structure.AuthorsStructureCMSA.from_config(original_config("cmsa-s"), num_outputs=17)
    model.load_state_dict(load_original_state_dict(fixture / "cmsa_s_32x24_random_init.pth"), strict=True)
    expected = load_file(fixture / "cmsa_s_32x24_expected_outputs.safetensors")
    with torch.no_grad():
        heatmaps = model.double().eval()(expected["pixel_values"])
    relative = ((heatmaps - expected["heatmaps"]).abs().max() / expected["heatmaps"].abs().max()).item()
    assert relative <= 1e-8, relative


def test_cifar_benchmark_allocator_choice(monkeypatch):
    """`--allocator`: the system's malloc preloads nothing; tcmalloc asked for but absent is an error naming it."""
    cifar10 = load_script("cifar10")
    assert cifar10.allocator_library("system") is None
    monkeypatch.setattr(cifar10.ctypes.util, "find_library", lambda name: None)
    assert cifar10.allocator_library("auto") is None
    with pytest.raises(SystemExit, match="libtcmalloc is not installed"):
        cifar10.allocator_library("tcmalloc")


@pytest.mark.skipif(
    ctypes.util.find_library("tcmalloc_minimal") is None and ctypes.util.find_library("tcmalloc") is None,
    reason="libtcmalloc is not installed (apt install libtcmalloc-minimal4)",
)
def test_cifar_benchmark_workers_run_on_the_preloaded_tcmalloc():
    """The library `allocator_library` names preloads, and `loaded_allocator` sees it (and its absence)."""
    cifar10 = load_script("cifar10")
    library = cifar10.allocator_library("tcmalloc")
    script = REPO_ROOT / "benchmarks" / "cifar10.py"
    probe = [sys.executable, "-c", f"import runpy; print(runpy.run_path({str(script)!r})['loaded_allocator']())"]
    environment = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    for preload, expected in ((library, "tcmalloc"), (None, "system")):
        env = {**environment, "LD_PRELOAD": preload} if preload else environment
        result = subprocess.run(probe, capture_output=True, text=True, check=True, env=env)
        assert result.stdout.strip().splitlines()[-1] == expected, result.stderr
