"""The benchmark scripts run end to end (tiny settings; no timing is asserted)."""

import importlib.util
import json

import torch
from conftest import REPO_ROOT


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
    assert [row["path"] for row in rows] == paths
    assert results["machine"]["matmul_gflops"] > 0 and results["machine"]["threads"] == torch.get_num_threads()
    for row in rows:
        assert len(row["batch_seconds"]) == 2 and row["throughput"] > 0 and row["flops_per_image"] > 0
        assert row["speedup_vs_eager"] > 0 and row["memory_mib"] is not None
    assert rows[0]["speedup_vs_eager"] == 1.0
    assert rows[1]["parameters"] < rows[0]["parameters"]  # the reparameterized form is smaller
    assert sum(row.get("fastest", False) for row in rows) == 1
    table = (tmp_path / "results.md").read_text()
    assert "| CMSA-S | reparameterized + channels_last | 32x24 |" in table
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
