"""The compiled CPU kernels of CBAM (search/nn/_cbam_cpu.cpp) against the plain definition."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch

from search.knobs import CBAMConfig
from search.nn import cbam_kernels
from search.nn.cbam import CBAM, reference_forward


@pytest.fixture(autouse=True)
def _settings_read_again():
    """Each test sees the environment it sets (the kernels read their settings once)."""
    cbam_kernels.settings.cache_clear()
    yield
    cbam_kernels.settings.cache_clear()


def _switch(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Turn the kernels on or off as a user would, through the environment."""
    if on:
        monkeypatch.delenv("CBAM_NAS_CPU_KERNELS", raising=False)
    else:
        monkeypatch.setenv("CBAM_NAS_CPU_KERNELS", "0")
    cbam_kernels.settings.cache_clear()


@pytest.fixture(scope="module")
def kernels():
    module = cbam_kernels.kernels()
    if module is None:
        reason = "the CBAM CPU kernels could not be built here (no compiler or headers)"
        if os.environ.get("CI"):  # CI installs a compiler: a build failure there is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return module


def _module(channels: int, config: CBAMConfig, train: bool, dtype: torch.dtype) -> CBAM:
    torch.manual_seed(0)
    module = CBAM(channels, config).to(dtype).train(train)
    bn = module.spatial_gate.bn
    if bn is not None:
        torch.nn.init.normal_(bn.weight)
        torch.nn.init.normal_(bn.bias)
    return module


def _run(module: CBAM, x: torch.Tensor, grad: torch.Tensor, forward) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    out = forward(module, x)
    out.backward(grad)
    return [
        out.detach(),
        x.grad,
        *(p.grad for p in module.parameters()),
        *module.buffers(),
    ]


CONFIGS = {
    "paper": CBAMConfig(),
    "timm": CBAMConfig.timm(),
    "max-k9": CBAMConfig(pool_types=("max",), kernel_size=9),
    "avg-k1-nobn": CBAMConfig(pool_types=("avg",), kernel_size=1, spatial_bn=False),
    "max-avg-k3-nobias": CBAMConfig(pool_types=("max", "avg"), kernel_size=3, mlp_bias=False),
    "k5-r2": CBAMConfig(kernel_size=5, reduction=2),
}
# 80 channels: wider than the register runs of the channels_last backward (32 float64 channels).
SHAPES = [
    (3, 16, 5, 7),
    (2, 8, 17, 40),
    (2, 4, 1, 1),
    (2, 20, 9, 70),
    (2, 32, 16, 16),
    (2, 80, 6, 6),
]


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_float64_reference(kernels, config, shape) -> None:
    for channels_last in (False, True):
        for train in (True, False):
            module = _module(shape[1], config, train, torch.float64)
            ref = copy.deepcopy(module)
            x = torch.randn(shape, dtype=torch.float64)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            assert cbam_kernels.kernel_route(x, module)[0] is kernels
            grad = torch.randn(shape, dtype=torch.float64)
            got = _run(module, x, grad, CBAM.__call__)
            want = _run(ref, x, grad, reference_forward)
            assert got[0].is_contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# float32 has code paths of its own: channels_last with a multiple of 16 channels pools blocks of
# 16 positions through a register transpose (10x10: six blocks and a tail of 4), and NCHW maps of
# a multiple of 16 positions reduce 16 channels at a time (20 channels: one block and 4 more).
@pytest.mark.parametrize(
    "shape",
    [
        (8, 64, 12, 12),
        (4, 16, 10, 10),
        (4, 32, 8, 8),
        (2, 48, 5, 7),
        (3, 20, 8, 8),
        (2, 256, 8, 8),
        (2, 144, 5, 7),
    ],
    ids=str,
)
def test_float32_kernels_agree_with_torch_path(kernels, monkeypatch, shape) -> None:
    x = torch.randn(shape)
    grad = torch.randn(shape)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        module = _module(shape[1], CBAMConfig(), True, torch.float32)
        other = copy.deepcopy(module)
        got = _run(module, xl, grad, CBAM.__call__)
        _switch(monkeypatch, False)
        assert cbam_kernels.kernel_route(xl, other) is None
        want = _run(other, xl, grad, CBAM.__call__)
        _switch(monkeypatch, True)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_non_contiguous_input_and_gradient(kernels) -> None:
    module = _module(16, CBAMConfig(), True, torch.float64)
    ref = copy.deepcopy(module)
    base = torch.randn(3, 32, 9, 11, dtype=torch.float64)
    x = base[:, ::2]  # neither contiguous nor channels_last
    grad = torch.randn(3, 16, 11, 9, dtype=torch.float64).transpose(2, 3)  # an odd layout
    for g, w in zip(
        _run(module, x, grad, CBAM.__call__), _run(ref, x, grad, reference_forward), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        out = module(xl.requires_grad_())
        out.backward(torch.ones(1, dtype=torch.float64).expand_as(out))  # a stride-0 gradient
        want = torch.autograd.grad(reference_forward(ref, xl).sum(), xl)[0]
        torch.testing.assert_close(xl.grad, want, rtol=1e-10, atol=1e-10)


# Rows of up to 256 values search the max in one vectorised pass, longer ones in blocks; float32
# in channels_last with a multiple of 16 channels pools transposed blocks of 16 positions.
TIE_SHAPES = [(2, 8, 4, 4), (2, 8, 20, 20), (1, 300, 2, 2), (2, 16, 4, 4), (2, 64, 4, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", TIE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("tie", ["positions", "channels"])
def test_ties_go_to_the_first_index_as_on_the_torch_path(
    kernels, monkeypatch, shape, layout, dtype, tie
) -> None:
    module = _module(shape[1], CBAMConfig(), True, dtype)
    if tie == "channels":  # one channel gate for all channels: the spatial max ties as well
        with torch.no_grad():
            module.channel_gate.fc2.weight.zero_()
            module.channel_gate.fc2.bias.zero_()
    other = copy.deepcopy(module)
    x = torch.ones(shape, dtype=dtype).contiguous(memory_format=layout)  # all max tie
    grad = torch.randn_like(x)
    got = _run(module, x, grad, CBAM.__call__)
    _switch(monkeypatch, False)
    want = _run(other, x, grad, CBAM.__call__)
    tol = 1e-10 if dtype is torch.float64 else 1e-4  # float32: a tie lost is off by O(1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_other_cases_stay_on_the_torch_path(kernels) -> None:
    x = torch.randn(2, 16, 6, 6)
    assert cbam_kernels.kernel_route(x, CBAM(16))[0] is kernels
    for config in (
        CBAMConfig(arrangement="parallel"),
        CBAMConfig(pool_types=("avg", "lp")),
        CBAMConfig(spatial_pool="conv"),
    ):
        assert cbam_kernels.kernel_route(x, CBAM(16, config)) is None
    assert cbam_kernels.kernel_route(x.bfloat16(), CBAM(16).bfloat16()) is None
    assert cbam_kernels.kernel_route(x.double(), CBAM(16)) is None  # parameters in float32


def test_fallback_when_the_build_fails(monkeypatch, caplog) -> None:
    def broken() -> None:
        raise RuntimeError("Error building extension 'cbam_nas_cpu'\ng++: not found")

    monkeypatch.setattr(cbam_kernels, "_build", broken)
    monkeypatch.setattr(cbam_kernels, "_state", {})
    module = _module(16, CBAMConfig(), True, torch.float64)
    ref = copy.deepcopy(module)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    grad = torch.randn_like(x)
    with caplog.at_level(logging.WARNING, logger="search.nn.cbam_kernels"):
        assert cbam_kernels.kernels() is None
        got = _run(module, x, grad, CBAM.__call__)
        _run(module, x, grad, CBAM.__call__)
    warnings = [r for r in caplog.records if r.name == "search.nn.cbam_kernels"]
    assert len(warnings) == 1 and "g++: not found" in warnings[0].getMessage()
    want = _run(ref, x, grad, reference_forward)
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_environment_turns_the_kernels_off_and_names_the_cache(monkeypatch, tmp_path) -> None:
    _switch(monkeypatch, False)
    assert not cbam_kernels.enabled()
    assert cbam_kernels.kernel_route(torch.randn(2, 8, 4, 4), CBAM(8)) is None
    monkeypatch.setenv("CBAM_NAS_KERNEL_CACHE_DIR", str(tmp_path))
    cbam_kernels.settings.cache_clear()
    assert cbam_kernels.cache_dir() == tmp_path
    monkeypatch.delenv("CBAM_NAS_KERNEL_CACHE_DIR")
    cbam_kernels.settings.cache_clear()
    assert cbam_kernels.cache_dir() == Path.home() / ".cache" / "cbam-nas"
    assert cbam_kernels._build_name().startswith("cbam_nas_cpu_")


def test_torch_compile_still_traces_the_plain_definition(kernels) -> None:
    module = _module(8, CBAMConfig(), False, torch.float32)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(compiled(x), module(x))


def test_kernel_plans_follow_the_module(kernels) -> None:
    """What the kernels read from a module is kept between calls; every way of changing the
    module's tensors or submodules after a call is seen by the next one."""
    x = torch.randn(2, 16, 5, 6)

    def check(module: CBAM, inputs: torch.Tensor) -> None:
        assert cbam_kernels.kernel_route(inputs, module) is not None
        want = reference_forward(copy.deepcopy(module), inputs)
        torch.testing.assert_close(module(inputs), want, rtol=1e-5, atol=1e-6)

    module = _module(16, CBAMConfig(), True, torch.float32)
    check(module, x)
    module.eval()  # the running statistics now
    check(module, x)
    module.double()  # a cast: the plan of float32 tensors is dropped
    check(module, x.double())
    module.float()
    fresh = {
        k: torch.randn_like(v) if v.is_floating_point() else v
        for k, v in module.state_dict().items()
    }
    fresh["spatial_gate.bn.running_var"].abs_()
    module.load_state_dict(fresh, assign=True)  # new tensor objects
    check(module, x)
    module.channel_gate.fc1.weight = torch.nn.Parameter(torch.randn(1, 16))  # assignment
    check(module, x)
    module.spatial_gate.conv = torch.nn.Conv2d(2, 1, 7, padding=3, bias=False)  # a new submodule
    check(module, x)
    swapped = {name: torch.randn_like(p) for name, p in module.named_parameters()}
    got = torch.func.functional_call(module, swapped, (x,))  # swapped in without any hook
    reference = copy.deepcopy(module)
    reference.load_state_dict(swapped, strict=False)
    torch.testing.assert_close(got, reference_forward(reference, x), rtol=1e-5, atol=1e-6)
    check(module, x)  # and its own tensors again after the call
    twin = copy.deepcopy(module)  # a copy reads its own tensors
    with torch.no_grad():
        twin.spatial_gate.conv.weight.mul_(-1)
    check(twin, x)
    assert not torch.allclose(twin(x), module(x))


def test_double_backward_is_refused_with_a_way_out(kernels) -> None:
    module = _module(16, CBAMConfig(), True, torch.float64)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(module(x).sum(), x, create_graph=True)
    (first,) = torch.autograd.grad(
        reference_forward(module, x).square().sum(), x, create_graph=True
    )
    (second,) = torch.autograd.grad(first.sum(), x)  # the way out the error names
    assert second.shape == x.shape and torch.isfinite(second).all()
