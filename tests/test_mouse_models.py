"""mouse_vision/models.py: layer shapes at 64 px, the release's parameter counts and state-dict names, Shi masks,
feature extraction and loading a released-layout checkpoint."""
import pytest
import torch

from common.runtime import UserError
from mouse_vision import models
from mouse_vision.models import (ARCHS, SHI_CONNECTIONS, build_model, count_parameters, extract_features,
                                 load_model_path, readout_layers)

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X1 = X[:1]  # Shi's large kernels at 64 px are slow on a CPU: one image


@pytest.fixture(scope="module")
def shi():
    torch.manual_seed(0)
    return build_model("shi_mousenet").eval()


def test_parameter_counts_match_the_release():
    # (total, trainable) as the release's models count them; Shi's frozen masks count in the total only
    expected = {"alexnet_bn": (57_022_528, 57_022_528), "dual_stream": (5_806_848, 5_806_848),
                "six_stream": (16_780_800, 16_780_800), "shi_mousenet": (5_974_858, 2_988_300),
                "shi_mousenet_vispor5": (5_974_858, 2_988_300)}
    for arch, counts in expected.items():
        assert count_parameters(build_model(arch)) == counts, arch


def test_alexnet_layer_shapes_at_64px():
    m = build_model("alexnet_bn").eval()
    f = extract_features(m, X, readout_layers("alexnet_bn"))
    shapes = {"features.3": 64 * 7 * 7, "features.7": 192 * 3 * 3, "features.10": 384 * 3 * 3,
              "features.13": 256 * 3 * 3, "features.17": 256, "classifier.3": 4096, "classifier.7": 4096}
    assert {k: v.shape[1] for k, v in f.items()} == shapes
    with torch.no_grad():
        assert torch.allclose(f["classifier.7"], m(X), atol=1e-6)  # the last readout is the output


def test_multistream_outputs_and_branch_sums():
    torch.manual_seed(0)
    m = build_model("dual_stream").eval()
    assert not any(k.startswith("classifier") for k in m.state_dict())
    assert "model_layers.VISp_ventral.4.weight" in m.state_dict()
    with torch.no_grad():
        a = m.forward_areas(X)
        assert m(X).shape == (2, 18432)
        assert a["VISp"].shape[1:] == (64, 7, 7) and a["ventral"].shape[1:] == (384, 3, 3)
        L = m.model_layers
        by_hand = L["VISp_VISam"](a["VISp"]) + L["ventral_VISam"](a["ventral"]) + L["dorsal_VISam"](a["dorsal"])
        assert torch.allclose(a["VISam"], by_hand)
    six = build_model("six_stream")
    assert readout_layers("six_stream") == ["VISp", "VISl", "VISrl", "VISal", "VISli", "VISpm", "VISpl", "VISpor", "VISam"]
    assert six.output_dim == 18432


def test_shi_readouts_and_concatenation_order(shi):
    assert len(SHI_CONNECTIONS) == 49 and len(readout_layers("shi_mousenet")) == 22
    with torch.no_grad():
        out = shi(X1)
        a = shi.forward_areas(X1)
    assert out.shape == (1, 2864)
    # VISpor5 (28 channels × 4 × 4) comes first, VISp5 (40 × 4 × 4) last: each new area prepended
    pooled = torch.nn.functional.adaptive_avg_pool2d
    assert torch.allclose(out[:, :28 * 16], pooled(a["VISpor5"], 4).flatten(1))
    assert torch.allclose(out[:, -40 * 16:], pooled(a["VISp5"], 4).flatten(1))
    assert a["VISp5"].shape[-1] == 64 and a["VISl4"].shape[-1] == 32 and a["LGNv"].min() < 0  # LGNv: no ReLU
    v5 = build_model("shi_mousenet_vispor5")
    assert v5.output_dim == 28672


def test_shi_masks_fixed_binary_and_saved(shi):
    conv = shi.Convs["VISp4_VISp2/3"]
    mask = conv.mask.detach().clone()
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and not conv.mask.requires_grad
    centre = mask[:, :, 4, 4].mean().item()  # kept with probability gsh = 0.162 at the kernel centre
    assert abs(centre - SHI_CONNECTIONS["VISp4_VISp2/3"][2]) < 0.05
    assert shi.Convs["VISal2/3_VISpor4"].mask.min() == 1  # gsh > 1: every 1×1 connection kept
    assert "Convs.VISp4_VISp2/3.mask" in shi.state_dict() and "BNs.LGNv.weight" in shi.state_dict()
    with torch.no_grad():
        first = shi(X1)
        assert torch.equal(first, shi(X1))  # fixed across forward passes
    # an optimizer step over the trainable parameters (as main.py builds it) leaves the masks alone
    m = build_model("shi_mousenet")
    before = m.Convs["VISp4_VISl4"].mask.clone()
    trainable = [p for p in m.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.ones_like(p)
    torch.optim.SGD(trainable, lr=0.1, weight_decay=0.1).step()
    assert torch.equal(before, m.Convs["VISp4_VISl4"].mask)
    # a differently seeded build has other masks; loading the state dict brings the saved ones
    other = models.ShiMouseNet(mask_seed=123).eval()
    assert not torch.equal(other.Convs["VISp4_VISp2/3"].mask, mask)
    other.load_state_dict(shi.state_dict())
    with torch.no_grad():
        assert torch.equal(other(X1), first)


@pytest.mark.parametrize("key,prefix", [("model_state_dict", "module."), ("state_dict", "")])
def test_released_layout_checkpoint_loads(tmp_path, key, prefix):
    torch.manual_seed(1)
    src = build_model("dual_stream").eval()
    path = tmp_path / "dual_stream_ir.pt"
    torch.save({key: {prefix + k: v for k, v in src.state_dict().items()}, "epoch": 200,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    torch.manual_seed(2)
    dst = build_model("dual_stream").eval()
    load_model_path(dst, path)
    with torch.no_grad():
        assert torch.equal(dst(X), src(X))
    with pytest.raises(UserError, match="does not fit"):
        load_model_path(build_model("six_stream"), path)


def test_bad_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown architecture"):
        build_model("resnet9000")
    with pytest.raises(UserError, match="unknown layer"):
        extract_features(build_model("dual_stream"), X, ["features.3"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="refused|could not be read"):
        load_model_path(build_model("dual_stream"), tmp_path / "junk.pt")
    assert set(ARCHS) >= {"alexnet_bn", "dual_stream", "six_stream", "shi_mousenet", "shi_mousenet_vispor5"}
