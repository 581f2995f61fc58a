"""The GPU path: CBAM under autocast and channels_last on CUDA, a mixed-precision ``train()``,
device checks and ``benchmarks/gpu.py``.

Tests marked ``requires_cuda`` run where ``torch.cuda.is_available()``, and are skipped where it
is not; device checks also run without a GPU, with torch's CUDA device count faked. This file
needs torch, pydantic and pytest only (no database, no service: those GPU checks are in
tests/test_gpu_service.py), so a GPU box without them runs it as
``PYTHONPATH=.:tests python -m pytest --noconftest tests/test_gpu.py``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import pytest
import torch
from support import ON_CUDA, fake_gpus, requires_cuda

from search.errors import InvalidValue
from search.nn.cbam import CBAM, reference_forward
from search.overhead import available_devices, check_device
from search.space import Architecture
from search.spec import TrainingSpec
from workers.data import DatasetTensors
from workers.graph_step import WARMUP, StaticStep, tensor_learning_rates
from workers.train import autocast_dtype, make_optimizer, train

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Largest relative error (norm of the difference / norm of the float64 result) of our CBAM's
# results at that dtype (float32: all of them, with room for TF32 convolutions; half types: the
# output, since their gradients are judged against the plain definition's), and how much worse
# than the plain definition's own error a result may be.
MAX_ERROR = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 3e-2}
WORSE_THAN_REFERENCE = 4.0
HALF_PRECISION_SEEDS = 8
CLASSES = 3
ON_THIS_MACHINE = "cuda" if torch.cuda.is_available() else "cpu"


def _skip_unless_supported(dtype: torch.dtype) -> None:
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bfloat16")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-12))


def _cbam_results(
    forward: Callable[[CBAM, torch.Tensor], torch.Tensor],
    module: CBAM,
    x: torch.Tensor,
    grad: torch.Tensor,
    dtype: torch.dtype | None,
) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of ``forward(module, x)``, with the
    forward pass under autocast at ``dtype`` (None: none) and ``x``, ``grad`` cast to it."""
    x = x.to(dtype or x.dtype).detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = forward(module, x)
    out.backward(grad.to(out.dtype))
    return [out.detach(), x.grad, *(p.grad for p in module.parameters())]


def cbam_errors(
    device: str,
    dtype: torch.dtype,
    channels_last: bool,
    shape: tuple[int, ...] = (8, 64, 16, 16),
    seed: int = 0,
) -> tuple[list[float], list[float], torch.Tensor]:
    """Relative errors against float64 of our CBAM and of the plain definition, both run at
    ``dtype`` (autocast for bf16/fp16) on ``device``, in training mode; and our output."""
    torch.manual_seed(seed)
    module = CBAM(shape[1]).to(device)
    torch.nn.init.normal_(module.spatial_gate.bn.weight)  # a spatial gate that is not 0.5
    torch.nn.init.normal_(module.spatial_gate.bn.bias)
    reference = copy.deepcopy(module)
    exact = copy.deepcopy(module).double()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # The input as a conv under autocast would hand it over: already at the half dtype.
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout)
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout)
    amp = None if dtype is torch.float32 else dtype
    ours = _cbam_results(lambda m, t: m(t), module, x, grad, amp)
    plain = _cbam_results(reference_forward, reference, x, grad, amp)
    want = _cbam_results(reference_forward, exact, x.double(), grad.double(), None)
    assert ours[0].dtype == dtype
    return (
        [_relative_error(g, w) for g, w in zip(ours, want, strict=True)],
        [_relative_error(g, w) for g, w in zip(plain, want, strict=True)],
        ours[0],
    )


def result_names(channels: int = 64) -> list[str]:
    """What each entry of ``cbam_errors``' lists is."""
    return ["output", "input gradient"] + [
        f"{n} gradient" for n, _ in CBAM(channels).named_parameters()
    ]


def tinted(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is the brighter colour channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randint(0, 100, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


def tinted_data() -> DatasetTensors:
    (tx, ty), (vx, vy), (sx, sy) = tinted(512, 0), tinted(128, 1), tinted(64, 2)
    return DatasetTensors(
        "tinted", tx, ty, vx, vy, sx, sy, CLASSES, 3, 16, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3)
    )


# -- CBAM on CUDA, and in half precision anywhere --------------------------------------------


@requires_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cbam_matches_the_reference_on_cuda(layout: str) -> None:
    ours, plain, out = cbam_errors("cuda", torch.float32, channels_last=layout == "channels_last")
    for name, error, reference_error in zip(result_names(), ours, plain, strict=True):
        assert error < MAX_ERROR[torch.float32], f"{name}: relative error {error:.2e}"
        assert error <= WORSE_THAN_REFERENCE * reference_error + MAX_ERROR[torch.float32], (
            f"{name}: {error:.2e} against the plain definition's {reference_error:.2e}"
        )
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cbam_in_half_precision_is_as_accurate_as_the_plain_definition(
    device: str, precision: str, layout: str
) -> None:
    """Under autocast, every result is within a few times the plain definition's own error.

    One draw is not enough to judge a half-precision gradient: parameter gradients are sums with
    cancellation, and the plain definition's error on one seed ranges from 1e-3 to 2e-1 (bf16),
    so each result's worst error over several seeds is compared, ours against the plain one's.
    """
    dtype = HALF[precision]
    if device == "cuda":
        _skip_unless_supported(dtype)
    runs = [
        cbam_errors(device, dtype, channels_last=layout == "channels_last", seed=seed)
        for seed in range(HALF_PRECISION_SEEDS)
    ]
    for i, name in enumerate(result_names()):
        ours = max(run[0][i] for run in runs)
        plain = max(run[1][i] for run in runs)
        assert ours <= WORSE_THAN_REFERENCE * plain + torch.finfo(dtype).eps, (
            f"{name}: worst relative error {ours:.2e} against the plain definition's {plain:.2e}"
        )
    assert max(run[0][0] for run in runs) < MAX_ERROR[dtype], "output"
    if layout == "channels_last":
        assert all(run[2].is_contiguous(memory_format=torch.channels_last) for run in runs)


@requires_cuda
def test_cbam_compiles_with_inductor_on_cuda() -> None:
    """torch.compile's default backend (Triton kernels on CUDA) traces the plain definition and
    gives eager's output and gradients."""
    torch.manual_seed(0)
    module = CBAM(64).cuda()
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(8, 64, 16, 16, device="cuda")
    grad = torch.randn_like(x)
    results = []
    for run in (module, compiled):
        t = x.clone().requires_grad_()
        out = run(t)
        out.backward(grad)
        results.append([out.detach(), t.grad, *(p.grad for p in module.parameters())])
        module.zero_grad(set_to_none=True)
    for got, want in zip(results[1], results[0], strict=True):
        assert _relative_error(got, want) < 1e-3


# -- training and workers on CUDA ------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_on_cuda_with_mixed_precision(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dtype = HALF[precision]
    _skip_unless_supported(dtype)
    if dtype is torch.float16:  # train() picks bf16 where the card has it: make it take fp16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_a, **_k: False)
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    assert autocast_dtype(device, True) is dtype
    assert autocast_dtype(device, False) is None
    settings = TrainingSpec(epochs=3, batch_size=64, lr=0.05, mixed_precision=True)
    result = train(Architecture("cifar_resnet20"), tinted_data(), settings, seed=0, device=device)
    assert result.epochs_run == 3 and result.stopped is None
    assert result.best_val_accuracy > 0.6  # chance is 1/3
    assert result.test_accuracy is not None and result.test_accuracy > 0.5
    assert all(torch.isfinite(torch.tensor(r.train_loss)) for r in result.curve)
    # Weights stay float32 under autocast, and come back on the CPU for safetensors.
    weights = [t for t in result.state_dict.values() if t.is_floating_point()]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in weights)


@requires_cuda
def test_the_static_step_is_captured_and_replays_as_it_ran_eagerly() -> None:
    """``training.cuda_graphs``: eager for WARMUP steps, then captured; the replays give the
    weights and sums the same steps give eagerly (fp32, same batches and learning rates)."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, CLASSES),
    ).to(device)
    steps = []
    for net in (model, copy.deepcopy(model)):
        optimizer = make_optimizer(net, TrainingSpec(lr=0.1), fused=True)
        tensor_learning_rates(optimizer, device)
        steps.append(StaticStep(net, optimizer, device, None, 0.0))
    steps[1].capture = False  # the same step, eagerly
    generator = torch.Generator(device=device).manual_seed(1)
    for i in range(WARMUP + 5):
        x = torch.randn(16, 3, 8, 8, device=device, generator=generator)
        y = torch.randint(0, CLASSES, (16,), device=device, generator=generator)
        for step in steps:
            step(x, y, 0.1 / (i + 1))
    assert steps[0].graph is not None and steps[1].graph is None
    captured, eager = (list(s.forward.parameters()) for s in steps)
    for a, b in zip(captured, eager, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    (loss_a, correct_a, bad_a), (loss_b, correct_b, bad_b) = (s.read() for s in steps)
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and correct_a == correct_b
    assert not bad_a and not bad_b


@requires_cuda
def test_train_on_cuda_with_the_static_step() -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    settings = TrainingSpec(
        epochs=3, batch_size=64, lr=0.05, mixed_precision=True, cuda_graphs=True
    )
    result = train(Architecture("cifar_resnet20"), tinted_data(), settings, seed=0, device=device)
    assert result.epochs_run == 3 and result.best_val_accuracy > 0.6  # chance is 1/3
    assert result.test_accuracy is not None and result.test_accuracy > 0.5


# -- devices ---------------------------------------------------------------------------------


@requires_cuda
def test_check_device_on_this_machine() -> None:
    count = torch.cuda.device_count()
    for index in range(count):
        assert check_device(f"cuda:{index}") == torch.device("cuda", index)
    assert check_device("cuda").type == "cuda"
    with pytest.raises(InvalidValue) as info:
        check_device(f"cuda:{count}")
    assert info.value.field == "device"
    assert "'cuda:0'" in str(info.value) and f"'cuda:{count - 1}'" in str(info.value)


def test_check_device_out_of_range_names_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    assert available_devices()[:4] == ["cpu", "cuda", "cuda:0", "cuda:1"]
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InvalidValue) as info:
        check_device("cuda:2")
    assert info.value.field == "device" and info.value.value == "cuda:2"
    assert "'cuda:0', 'cuda:1'" in str(info.value)


def test_check_device_without_gpus_allows_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(InvalidValue, match="allowed: 'cpu'"):
            check_device(device)


@pytest.mark.e2e
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_the_device_checks_slots_train_side_by_side(device: str) -> None:
    """``benchmarks/gpu.py``'s slots part: two processes, each one trial, started together;
    their aggregate training rate comes back (on the CPU here, on the GPU where there is one)."""
    from benchmarks.gpu import concurrent_trials

    assert concurrent_trials("cifar_resnet20", "se", 2, device, (64, 32, 1, 32)) > 0


@pytest.mark.e2e
def test_the_device_checks_graphs_part_compares_the_two_steps(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``benchmarks/gpu.py``'s graphs table, on the CPU here (the static step runs eagerly)."""
    import benchmarks.gpu as gpu

    monkeypatch.setattr(gpu, "BACKBONES", {"cifar_resnet20": "CIFAR ResNet-20"})
    settings = argparse.Namespace(
        images=128, val_images=64, epochs=1, batch_size=32, trial_rounds=1
    )
    gpu.graphs_table(torch.device(ON_THIS_MACHINE), settings)
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| CIFAR ResNet-20")]
    assert len(rows) == 2  # no attention, ours
    for row in rows:
        eager, graphs, ratio = (float(c) for c in row.strip("|").split("|")[2:])
        assert eager > 0 and graphs > 0 and ratio == pytest.approx(graphs / eager, abs=0.01)


def test_the_device_check_exits_cleanly_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.gpu import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would measure")
    assert main(["--quick"]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--parts", "block,graphs"])
