"""CBAM: the fused module against its plain definition, timm, SE, and the spec's invariants."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

from search.errors import InvalidValue
from search.knobs import ARRANGEMENTS, CBAMConfig
from search.nn.attention import create_attention
from search.nn.banded_conv import spatial_conv
from search.nn.cbam import CBAM, reference_forward
from search.nn.squeeze_excite import SqueezeExcite

POOL_SETS = [("avg", "max"), ("avg",), ("max",), ("lp",), ("lse",), ("avg", "max", "lp", "lse")]


def _randomise(module: CBAM) -> CBAM:
    """Non-trivial BatchNorm parameters, so the spatial gate is not constant 0.5."""
    spatial = module.spatial_gate
    if spatial is not None and spatial.bn is not None:
        torch.nn.init.normal_(spatial.bn.weight)
        torch.nn.init.normal_(spatial.bn.bias)
    return module


def _fused_and_reference(
    config: CBAMConfig,
    shape: tuple[int, int, int, int] = (3, 8, 5, 6),
    channels_last: bool = False,
    train: bool = True,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs, input gradients, parameter gradients and buffers of both paths."""
    torch.manual_seed(0)
    fused = _randomise(CBAM(shape[1], config)).to(dtype).train(train)
    ref = copy.deepcopy(fused).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, dtype=torch.float64)
    x_fused = x.to(dtype).clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    out_fused = fused(x_fused)
    out_fused.backward(grad.to(dtype))
    out_ref = reference_forward(ref, x_ref)
    out_ref.backward(grad)

    def collect(module: CBAM, out: torch.Tensor, xin: torch.Tensor) -> list[torch.Tensor]:
        return [
            out.detach().double(),
            xin.grad.double(),
            *(p.grad.double() for p in module.parameters()),
            *(b.double() for b in module.buffers()),
        ]

    return collect(fused, out_fused, x_fused), collect(ref, out_ref, x_ref)


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("pool_types", POOL_SETS, ids="+".join)
@pytest.mark.parametrize("spatial_pool", ["maxmean", "conv"])
def test_fused_matches_float64_reference(
    arrangement: str, pool_types: tuple[str, ...], spatial_pool: str
) -> None:
    config = CBAMConfig(arrangement=arrangement, pool_types=pool_types, spatial_pool=spatial_pool)
    for channels_last in (False, True):
        got, want = _fused_and_reference(config, channels_last=channels_last)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "config",
    [
        CBAMConfig(kernel_size=1),
        CBAMConfig(kernel_size=3, spatial_bn=False, mlp_bias=False),
        CBAMConfig(kernel_size=9, reduction=2),
        CBAMConfig.timm(),
        CBAMConfig(arrangement="spatial-channel", kernel_size=5, reduction=64),
    ],
    ids=["k1", "k3-nobn-nobias", "k9-r2", "timm", "sc-k5-r64"],
)
def test_fused_matches_reference_for_other_knobs(config: CBAMConfig) -> None:
    for train in (True, False):
        got, want = _fused_and_reference(config, shape=(2, 16, 7, 9), train=train)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_float32_fused_is_close_to_float64_reference() -> None:
    got, want = _fused_and_reference(CBAMConfig(), shape=(4, 32, 12, 12), dtype=torch.float32)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (2, 4, 5, 70)], ids=["two-stage-max", "conv2d"])
def test_large_maps_take_the_other_kernels(shape: tuple[int, int, int, int]) -> None:
    # >= 256 positions: the row-then-column max over H x W; wider than 64: oneDNN's convolution.
    for arrangement in ("channel-spatial", "spatial-channel"):
        got, want = _fused_and_reference(CBAMConfig(arrangement=arrangement), shape=shape)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("width", [1, 4, 33])
def test_spatial_conv_equals_conv2d(kernel_size: int, width: int) -> None:
    maps = torch.randn(3, 2, 6, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    out = spatial_conv(maps, weight)
    want = F.conv2d(maps, weight, padding=kernel_size // 2)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), [maps, weight])
    want_grads = torch.autograd.grad(want.square().sum(), [maps, weight])
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_shape_kept_and_gates_in_unit_interval(arrangement: str) -> None:
    module = _randomise(CBAM(24, CBAMConfig(arrangement=arrangement)))
    for scale, layout in ((1.0, torch.contiguous_format), (4.0, torch.channels_last)):
        x = (torch.randn(2, 24, 9, 7) * scale).contiguous(memory_format=layout)
        out = module(x)
        assert out.shape == x.shape
        gate_c, gate_s = module.gates(x)
        for gate in (gate_c, gate_s):
            if gate is not None:
                assert bool(((gate > 0) & (gate < 1)).all())
        assert (gate_c is not None) == (arrangement != "spatial")
        assert (gate_s is not None) == (arrangement != "channel")


def test_output_keeps_channels_last() -> None:
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    module = CBAM(16, CBAMConfig(spatial_pool="conv")).to(memory_format=torch.channels_last)
    out = module(x.requires_grad_())
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_each_arrangement_computes_its_definition(arrangement: str) -> None:
    torch.manual_seed(1)
    module = _randomise(CBAM(12, CBAMConfig(arrangement=arrangement))).eval()
    x = torch.randn(3, 12, 6, 5)
    channel, spatial = module.channel_gate, module.spatial_gate

    def mc(t: torch.Tensor) -> torch.Tensor:
        pooled = torch.stack([t.mean((2, 3)), t.amax((2, 3))])
        hidden = F.relu(F.linear(pooled, channel.fc1.weight, channel.fc1.bias))
        logits = F.linear(hidden, channel.fc2.weight, channel.fc2.bias).sum(0)
        return torch.sigmoid(logits)[:, :, None, None]

    def ms(t: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([t.amax(1, keepdim=True), t.mean(1, keepdim=True)], 1)
        z = F.conv2d(maps, spatial.conv.weight, padding=3)
        z = F.batch_norm(
            z, spatial.bn.running_mean, spatial.bn.running_var, spatial.bn.weight, spatial.bn.bias
        )
        return torch.sigmoid(z)

    want = {
        "channel-spatial": lambda: ms(mc(x) * x) * (mc(x) * x),
        "spatial-channel": lambda: mc(ms(x) * x) * (ms(x) * x),
        "parallel": lambda: x * mc(x) * ms(x),
        "channel": lambda: mc(x) * x,
        "spatial": lambda: ms(x) * x,
    }[arrangement]()
    with torch.no_grad():
        torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-6)


def test_authors_init_gives_spatial_gate_one_half() -> None:
    module = CBAM(32)
    x = torch.randn(4, 32, 10, 10) * 3
    for mode in (True, False):
        module.train(mode)
        _, gate_s = module.gates(x)
        torch.testing.assert_close(gate_s, torch.full_like(gate_s, 0.5))
    bn = module.spatial_gate.bn
    assert bn.momentum == pytest.approx(0.01)
    assert float(bn.weight.detach()) == 0.0 and float(bn.bias.detach()) == 0.0


def test_running_statistics_updated_once_per_forward() -> None:
    module = _randomise(CBAM(8))
    ref = copy.deepcopy(module)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    module(x).sum().backward()
    reference_forward(ref, x.detach()).sum()
    bn, ref_bn = module.spatial_gate.bn, ref.spatial_gate.bn
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1


def test_channel_only_with_average_pooling_equals_squeeze_excitation() -> None:
    torch.manual_seed(2)
    channels = 64
    cbam = CBAM(channels, CBAMConfig(arrangement="channel", pool_types=("avg",)))
    se = SqueezeExcite(channels)
    timm_se = SEModule(channels, rd_channels=channels // 16)
    se.load_state_dict(cbam.state_dict())
    with torch.no_grad():
        gate = cbam.channel_gate
        timm_se.fc1.weight.copy_(gate.fc1.weight[:, :, None, None])
        timm_se.fc1.bias.copy_(gate.fc1.bias)
        timm_se.fc2.weight.copy_(gate.fc2.weight[:, :, None, None])
        timm_se.fc2.bias.copy_(gate.fc2.bias)
    x = torch.randn(3, channels, 7, 7)
    with torch.no_grad():
        want = timm_se(x)
        torch.testing.assert_close(cbam(x), want)
        torch.testing.assert_close(se(x), want)
    assert sum(p.numel() for p in se.parameters()) == sum(p.numel() for p in timm_se.parameters())


def _timm_pair(channels: int, reduction: int = 16) -> tuple[CBAM, CbamModule]:
    torch.manual_seed(3)
    ours = CBAM(channels, CBAMConfig.timm(reduction=reduction))
    theirs = CbamModule(channels, rd_ratio=1 / reduction)
    with torch.no_grad():
        theirs.spatial.conv.bn.weight.normal_()
        theirs.spatial.conv.bn.bias.normal_()
    sd = theirs.state_dict()
    ours.channel_gate.fc1.weight.data.copy_(sd["channel.fc1.weight"].flatten(1))
    ours.channel_gate.fc2.weight.data.copy_(sd["channel.fc2.weight"].flatten(1))
    ours.spatial_gate.conv.weight.data.copy_(sd["spatial.conv.conv.weight"])
    bn = ours.spatial_gate.bn
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(bn, name).data.copy_(sd[f"spatial.conv.bn.{name}"])
    return ours, theirs


@pytest.mark.parametrize("channels", [24, 40, 64])
def test_timm_compatible_setting_equals_timm_cbam(channels: int) -> None:
    ours, theirs = _timm_pair(channels)
    assert ours.channel_gate.fc1.out_features == theirs.channel.fc1.out_channels
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    x = torch.randn(4, channels, 9, 9)
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-6)
        grad = torch.randn_like(x)
        out_ours.backward(grad)
        out_theirs.backward(grad)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        ours.spatial_gate.bn.running_mean, theirs.spatial.conv.bn.running_mean
    )


def test_timm_setting_rounds_hidden_width_half_up() -> None:
    assert CBAMConfig.timm().hidden_channels(24) == 2  # 1.5 -> 2; the authors' floor gives 1
    assert CBAMConfig().hidden_channels(24) == 1
    assert CBAMConfig(reduction=64).hidden_channels(16) == 1


def test_paper_parameter_count_per_module() -> None:
    # MLP 256*16 + 16 + 16*256 + 256, spatial conv 2*7*7, BN 2.
    assert sum(p.numel() for p in CBAM(256).parameters()) == 8464 + 98 + 2


def test_inference_without_grad_equals_training_path() -> None:
    module = _randomise(CBAM(16)).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        no_grad = module(x)
    with_grad = module(x.requires_grad_())
    torch.testing.assert_close(no_grad, with_grad.detach())


def test_bfloat16_autocast_runs_forward_and_backward() -> None:
    module = CBAM(32)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.conv2d(x, torch.randn(32, 32, 1, 1))
        out = module(y)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_works_under_torch_compile() -> None:
    module = _randomise(CBAM(8)).eval()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(compiled(x), module(x))


def test_runs_the_plain_definition_off_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerators (here the meta device, which has no CPU kernels) get the plain ops, with a
    real convolution for the spatial gate, not the fused function or the banded product."""
    from search.nn import banded_conv, cbam_fused

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the fused path ran off the CPU")

    monkeypatch.setattr(cbam_fused.FusedGates, "apply", refuse)
    monkeypatch.setattr(banded_conv, "banded_conv", refuse)
    module = CBAM(16).to("meta")
    x = torch.empty(2, 16, 8, 8, device="meta", requires_grad=True)
    out = module(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"kernel_size": 4}, "kernel_size", "1, 3, 5, 7, 9"),
        ({"kernel_size": 11}, "kernel_size", "1, 3, 5, 7, 9"),
        ({"reduction": 0}, "reduction", ">= 1"),
        ({"pool_types": ()}, "pool_types", "non-empty"),
        ({"pool_types": ("avg", "median")}, "pool_types[1]", "'avg', 'max', 'lp', 'lse'"),
        ({"arrangement": "diagonal"}, "arrangement", "'channel-spatial'"),
        ({"spatial_pool": "min"}, "spatial_pool", "'maxmean', 'conv'"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(
    kwargs: dict, field: str, allowed: str
) -> None:
    with pytest.raises(InvalidValue) as err:
        CBAMConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}:")
    assert allowed in str(err.value)


def test_create_attention() -> None:
    assert isinstance(create_attention("none", 8), torch.nn.Identity)
    assert isinstance(create_attention("se", 8), SqueezeExcite)
    cbam = create_attention("cbam", 8, CBAMConfig(kernel_size=3))
    assert isinstance(cbam, CBAM) and cbam.spatial_gate.conv.kernel_size == (3, 3)
    with pytest.raises(InvalidValue, match=r"attention: 'eca'.*'none', 'se', 'cbam'"):
        create_attention("eca", 8)


def test_every_arrangement_and_pool_set_is_buildable() -> None:
    for arrangement, pools in itertools.product(ARRANGEMENTS, POOL_SETS):
        module = CBAM(16, CBAMConfig(arrangement=arrangement, pool_types=pools))
        out = module(torch.randn(1, 16, 4, 4, requires_grad=True))
        out.sum().backward()
