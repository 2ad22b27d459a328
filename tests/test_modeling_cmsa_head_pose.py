"""CMSAForHeadPoseEstimation: paper sizes, both heads, the angle-bin codec, the losses, the flip test and
reparameterization."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise_batch_norms, tiny_config

from cmsa_hf import AngleBinCodec, CMSAConfig, CMSAForHeadPoseEstimation
from cmsa_hf.codecs import mirror_angles
from cmsa_hf.modeling_cmsa import CMSABinnedAngleHead, CMSAReparamConv


def _paper_count(model) -> int:
    """The paper's counting convention (benchmarks/model_stats.py): the reparameterizable convolutions drop out."""
    folded = sum(p.numel() for m in model.modules() if isinstance(m, CMSAReparamConv) for p in m.parameters())
    return model.num_parameters() - folded


@pytest.mark.parametrize("name, paper_millions", [("cmsa-s", 4.0), ("cmsa-b", 5.4), ("cmsa-l", 7.1)])
def test_the_preset_ssr_head_has_the_parameters_of_table_3(name, paper_millions):
    counts = {}
    for head in ("ssr", "binned"):
        config = CMSAConfig.from_variant(name, image_size=(32, 32), head_pose_head=head)
        counts[head] = _paper_count(CMSAForHeadPoseEstimation(config)) / 1e6
        print(f"{name} head pose 32x32 {head}: {counts[head]:.3f}M paper's count ({counts[head] / paper_millions - 1:+.1%} vs {paper_millions}M)")
    assert CMSAConfig().head_pose_head == "ssr"  # the preset
    assert round(counts["ssr"], 1) == paper_millions
    assert round(counts["binned"], 1) > paper_millions  # the Hopenet head (a Linear to 198 logits) is too large
    assert 0.03 < counts["binned"] - counts["ssr"] < 0.08


@pytest.mark.parametrize("head", ["binned", "ssr"])
@pytest.mark.parametrize("image_size", [(32, 32), (64, 64)])
def test_heads_run_at_the_face_resolutions(head, image_size):
    model = CMSAForHeadPoseEstimation(CMSAConfig.from_variant("cmsa-s", image_size=image_size, head_pose_head=head)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *image_size), output_hidden_states=True)
    assert out.angles.shape == (2, 3) and len(out.hidden_states) == 3
    assert (out.logits is None) == (head == "ssr")
    if head == "binned":
        assert out.logits.shape == (2, 3, 66)


def test_angle_bin_codec():
    codec = AngleBinCodec(66, 3.0)
    assert codec.encode(torch.tensor([-99.0, -97.1, -0.1, 0.0, 98.9, 99.0, 150.0, -150.0])).tolist() == [0, 0, 32, 33, 65, 65, 65, 0]
    assert codec.centres[0].item() == -97.5 and codec.centres[-1].item() == 97.5
    peaked = torch.full((2, 66), -30.0)
    peaked[0, 10], peaked[1, 40] = 30.0, 30.0
    torch.testing.assert_close(codec.decode(peaked), torch.tensor([-67.5, 22.5]))
    logits = torch.randn(4, 3, 66)
    torch.testing.assert_close(codec.decode(CMSABinnedAngleHead.mirror_logits(logits)), mirror_angles(codec.decode(logits)))


def test_binned_loss_is_cross_entropy_plus_alpha_mse():
    torch.manual_seed(0)
    model = CMSAForHeadPoseEstimation(tiny_config(head_pose_head="binned", head_pose_regression_weight=0.5))
    labels = torch.tensor([[30.0, -10.0, 5.0], [-60.0, 20.0, 0.0]])
    out = model(torch.randn(2, 3, 16, 16), labels=labels)
    bins = AngleBinCodec().encode(labels)
    cross_entropy = F.cross_entropy(out.logits.flatten(0, 1), bins.flatten(), reduction="none").view(2, 3)
    expected = (cross_entropy + 0.5 * (out.angles - labels) ** 2).sum(1).mean()
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()


def test_ssr_loss_is_l1_and_angles_stay_in_range():
    torch.manual_seed(0)
    model = CMSAForHeadPoseEstimation(tiny_config(head_pose_head="ssr"))
    labels = torch.tensor([[30.0, -10.0, 5.0]])
    out = model(torch.randn(1, 3, 16, 16), labels=labels)
    torch.testing.assert_close(out.loss, (out.angles - labels).abs().sum())
    out.loss.backward()
    assert sum(p.numel() for p in model.head.parameters()) < 5000


def test_bad_labels_and_config():
    model = CMSAForHeadPoseEstimation(tiny_config())
    with pytest.raises(ValueError, match=r"labels must be \(batch, 3\)"):
        model(torch.randn(2, 3, 16, 16), labels=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"head_pose_head must be one of the head-pose-estimation heads 'ssr', 'binned', got 'hopenet'"):
        tiny_config(head_pose_head="hopenet")
    with pytest.raises(ValueError, match="ssr_stage_bins needs one entry per stage"):
        tiny_config(ssr_stage_bins=[3, 3])


@pytest.mark.parametrize("head", ["binned", "ssr"])
@pytest.mark.parametrize(
    "labels, error, message",
    [
        (torch.tensor([[10.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), ValueError, r"labels holds NaN or inf values \(samples \[0\]"),
        (torch.tensor([[0.0, 0.0, 0.0], [120.0, 0.0, 0.0]]), ValueError, r"labels of samples \[1\] lie outside \[-99, 99\] degrees.*head_pose_bins=66 x head_pose_bin_width=3"),
        ([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], TypeError, r"labels must be a torch.Tensor, got a list"),
    ],
    ids=["nan", "beyond-the-bins", "list"],
)
def test_bad_angle_labels_name_the_problem(head, labels, error, message):
    model = CMSAForHeadPoseEstimation(tiny_config(head_pose_head=head)).eval()
    with pytest.raises(error, match=message):
        model(torch.randn(2, 3, 16, 16), labels=labels)


def test_the_angle_range_follows_the_bins():
    model = CMSAForHeadPoseEstimation(tiny_config(head_pose_bins=40, head_pose_bin_width=5.0)).eval()
    assert model.config.head_pose_max_angle == 100.0
    model(torch.randn(1, 3, 16, 16), labels=torch.tensor([[100.0, -100.0, 0.0]]))  # the range's ends are fine
    with pytest.raises(ValueError, match=r"outside \[-100, 100\] degrees"):
        model(torch.randn(1, 3, 16, 16), labels=torch.tensor([[100.5, 0.0, 0.0]]))


@pytest.mark.parametrize("head", ["binned", "ssr"])
def test_flip_test_mirrors_yaw_and_roll_exactly(head):
    torch.manual_seed(0)
    model = randomise_batch_norms(CMSAForHeadPoseEstimation(tiny_config(head_pose_head=head)), seed=1).double().eval()
    pixels = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        direct = model(pixels, flip_test=True)
        mirrored = model(pixels.flip(-1), flip_test=True)
    torch.testing.assert_close(mirrored.angles, mirror_angles(direct.angles), rtol=1e-9, atol=1e-9)
    assert torch.all(torch.sign(mirrored.angles[:, [0, 2]]) == -torch.sign(direct.angles[:, [0, 2]]))
    if head == "binned":
        torch.testing.assert_close(mirrored.logits, CMSABinnedAngleHead.mirror_logits(direct.logits), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("head", ["ssr", "binned"])
def test_reparameterized_head_pose_model_matches(head):
    torch.manual_seed(0)
    model = randomise_batch_norms(CMSAForHeadPoseEstimation(tiny_config(head_pose_head=head)), seed=2).double().eval()
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    folded = copy.deepcopy(model).reparameterize()
    with torch.no_grad():
        torch.testing.assert_close(folded(pixels).angles, model(pixels).angles, rtol=1e-9, atol=1e-9)
