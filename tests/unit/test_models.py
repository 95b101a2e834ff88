import pytest
import torch

from foveation.config import Config, ConfigError, MixConfig, config_from_dict
from foveation.models import FoveatedSegmenter, FoveationNet, Segmenter, build_model
from foveation.models.foveated import check_config
from foveation.models.mixing import MIXERS, MixContext, mix
from foveation.models.pretrained import PretrainedMismatch, load_pretrained
from foveation.patches import pad_xr


def bank_and_w(n=6, d=3, p=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.rand((n, d, 3, p, p), generator=g) * 255
    w = torch.softmax(torch.randn((n, d), generator=g), 1)
    return bank, w


def h_of(mode, w, **kw):
    cfg = MixConfig(mode, **kw)
    return MIXERS[mode](w, MixContext(cfg, step=0, total_steps=10, training=True))


@pytest.mark.parametrize("k", [0, 1, 2])
def test_onehot_returns_exactly_patch_k(k):
    bank, w = bank_and_w()
    torch.testing.assert_close(mix(bank, h_of("onehot", w, index=k)), bank[:, k], rtol=0, atol=0)


def test_soft_weights_sum_to_one_and_gradients_reach_every_parameter_of_f():
    torch.manual_seed(0)
    fov = FoveationNet(3)
    xr = torch.randn(2, 3, 12, 12)
    w = fov(pad_xr(xr))
    assert w.shape == (2, 3, 12, 12)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 12, 12))
    bank, _ = bank_and_w(n=4)
    wl = w[0, :, 0:2, 0:2].reshape(3, 4).T
    loss = (mix(bank, h_of("soft", wl)) * torch.randn_like(bank[:, 0])).sum()
    loss.backward()
    for name, p in fov.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("st", ["plain", "inverse"])
def test_hard_forward_is_onehot_with_straight_through_gradient(st):
    bank, w = bank_and_w()
    w = w.clone().requires_grad_(True)
    h = h_of("hard", w, straight_through=st)
    expect = torch.nn.functional.one_hot(w.argmax(1), 3).float()
    torch.testing.assert_close(h, expect)
    torch.testing.assert_close(mix(bank, h), bank[torch.arange(6), w.argmax(1)])
    (mix(bank, h) * torch.randn_like(bank[:, 0])).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_random_varies_across_locations_and_calls():
    w = torch.full((200, 5), 0.2)
    a, b = h_of("random", w), h_of("random", w)
    assert (a.sum(1) == 1).all() and ((a == 0) | (a == 1)).all()
    assert len(set(a.argmax(1).tolist())) == 5  # varies across locations
    assert not torch.equal(a, b)  # and across calls (fresh per step)


def test_average_and_gumbel():
    _, w = bank_and_w()
    torch.testing.assert_close(h_of("average", w), torch.full_like(w, 1 / 3))
    g = h_of("gumbel", w)
    torch.testing.assert_close(g.sum(1), torch.ones(6))
    gh = h_of("gumbel", w, gumbel_hard=True)
    assert ((gh == 0) | (gh == 1)).all()
    # at evaluation gumbel is deterministic
    ev = MixContext(MixConfig("gumbel", gumbel_hard=True), training=False)
    assert torch.equal(MIXERS["gumbel"](w, ev), MIXERS["gumbel"](w, ev))


def test_foveation_net_matches_the_paper_layers():
    f = FoveationNet(5)
    convs = [m for m in f.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [40, 40, 5]
    assert all(c.kernel_size == (3, 3) for c in convs)
    # about 17.5k (docs/method.md#foveation-net)
    assert 17_000 < sum(p.numel() for p in f.parameters()) < 18_500


def test_hrnet_w48_segmenter_has_about_66m_parameters():
    seg = Segmenter("hrnet_w48", num_classes=4)
    n = sum(p.numel() for p in seg.parameters())
    assert 65.5e6 < n < 67.0e6, n
    assert seg.decoder[0].in_channels == 720  # the paper's fc_dim


def test_segmenter_output_stride_and_receptive_field_spans_the_patch():
    torch.manual_seed(0)
    seg = Segmenter("hrnet_w18_small", num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = seg(x)
    assert out.shape == (1, 4, 16, 16)
    out[0, :, 8, 8].sum().backward()
    g = x.grad[0].abs().sum(0)
    # the centre output depends on all four corners of the input patch
    for corner in (g[:4, :4], g[:4, -4:], g[-4:, :4], g[-4:, -4:]):
        assert corner.sum() > 0


def test_patch_sizes_that_are_not_multiples_of_32_keep_their_geometry():
    torch.manual_seed(0)
    seg = Segmenter("hrnet_w18_small", num_classes=4).eval()
    x = torch.randn(1, 3, 100, 68)  # like the paper's 1100 px: not a multiple of 32
    out = seg(x)
    assert out.shape == (1, 4, 25, 17)
    # padding only bottom/right: the top-left of the output equals that of the padded input's
    padded = torch.nn.functional.pad(x, (0, 96 - 68, 0, 128 - 100))
    torch.testing.assert_close(out, seg(padded)[..., :25, :17])


def test_any_timm_features_backbone():
    seg = Segmenter("timm:resnet18", num_classes=3)
    assert seg(torch.randn(2, 3, 64, 64)).shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        check_config(config_from_dict({"model": {"backbone": "timm:not_a_model_at_all"}}))


def test_foveated_segmenter_forward(debug_cfg):
    torch.manual_seed(0)
    model = FoveatedSegmenter(debug_cfg)
    bank = torch.randint(0, 256, (5, 3, 3, 64, 64), dtype=torch.uint8)
    xr = torch.randn(5, 3, 7, 7)
    w = model.location_weights(xr)
    logits, h = model(bank, w)
    assert logits.shape == (5, 4, 16, 16) and h.shape == (5, 3)
    apsm = model.apsm(torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]]))
    assert apsm.item() == debug_cfg.patches.fovs[0]


def test_f_on_neighbourhoods_equals_f_on_the_whole_map(debug_cfg):
    from foveation.patches import all_locations, xr_neighbourhoods

    torch.manual_seed(0)
    model = FoveatedSegmenter(debug_cfg).eval()
    xr = torch.randn(3, 9, 11)
    full = model.weights(pad_xr(xr)[None])[0]
    locs = all_locations(9 * 16, 11 * 16, 16)
    local = model.location_weights(xr_neighbourhoods(xr, locs))
    torch.testing.assert_close(local, full[:, locs[:, 0], locs[:, 1]].T)


@pytest.mark.parametrize("fmt", ["timm_safetensors", "authors_pth"])
def test_imagenet_weights_from_a_local_file(tmp_path, fmt):
    donor = Segmenter("hrnet_w18_small", 4).encoder
    sd = donor.state_dict()
    if fmt == "timm_safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(
            {k: v.contiguous() for k, v in sd.items()}
            | {"classifier.weight": torch.zeros(1000, 2048)},
            str(path),
        )
    else:  # the HRNet authors' checkpoints: wrapped, DataParallel prefixes
        path = tmp_path / "hrnet_imagenet.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, str(path))
    cfg = config_from_dict({"model": {"pretrained": str(path)}})
    model = build_model(cfg)
    for k, v in model.segmenter.encoder.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_mismatched_or_unreadable_weights_are_refused(tmp_path):
    other = Segmenter("timm:resnet18", 4).encoder
    path = tmp_path / "resnet.pth"
    torch.save(other.state_dict(), str(path))
    with pytest.raises(PretrainedMismatch, match="does not match"):
        load_pretrained(Segmenter("hrnet_w18_small", 4).encoder, path)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedMismatch, match="cannot read"):
        load_pretrained(Segmenter("hrnet_w18_small", 4).encoder, junk)


def test_build_model_default_is_random_init():
    a, b = build_model(Config()), build_model(Config())
    assert a.segmenter.decoder[-1].weight.shape == (4, a.segmenter.decoder[0].out_channels, 1, 1)
    assert not torch.equal(a.segmenter.decoder[-1].weight, b.segmenter.decoder[-1].weight)
