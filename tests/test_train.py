"""The training loop and the batched augmentation, on tiny synthetic data (16x16, 256 images)."""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from search.build import build_model
from search.errors import InvalidValue
from search.space import Architecture
from search.spec import TrainingSpec
from workers.augment import alternate, augment, crop, mirror, normalizer, to_float
from workers.data import DatasetTensors, ImageFiles, StreamingData
from workers.graph_step import StaticStep, static_step_refusal, tensor_learning_rates
from workers.train import (
    EpochReport,
    StopTraining,
    TrialFailed,
    evaluate,
    lr_factor,
    make_optimizer,
    train,
    tune_allocator,
)

ARCH = Architecture("cifar_resnet20")  # the paper's CBAM in every block
SETTINGS = TrainingSpec(epochs=2, batch_size=64, lr=0.05)
CLASSES = 3


def tinted(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class is the brighter colour channel: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randint(0, 100, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y] += 120
    return x, y


def make_data(std: float = 0.3) -> DatasetTensors:
    (tx, ty), (vx, vy), (sx, sy) = tinted(256, 0), tinted(96, 1), tinted(48, 2)
    return DatasetTensors(
        "synthetic", tx, ty, vx, vy, sx, sy, CLASSES, 3, 16, (0.4, 0.4, 0.4), (std, std, std)
    )


@pytest.fixture(scope="module")
def data() -> DatasetTensors:
    return make_data()


@pytest.fixture(scope="module")
def trained(data: DatasetTensors):
    return train(ARCH, data, SETTINGS, seed=0)


# -- training --------------------------------------------------------------------------------


def test_learns_above_chance(trained) -> None:
    assert trained.best_val_accuracy > 0.6  # chance is 1/3
    assert trained.best_val_accuracy == max(r.val_accuracy for r in trained.curve)
    assert trained.final_val_accuracy == trained.curve[-1].val_accuracy
    assert trained.test_accuracy is not None and trained.test_accuracy > 0.5
    assert trained.epochs_run == 2 and trained.stopped is None
    assert trained.wall_time_s > 0
    # 4 full batches of 64 per epoch, over the whole trial's time
    assert trained.images_per_s == pytest.approx(2 * 256 / trained.wall_time_s)
    report = trained.curve[0]
    assert report.epoch == 1 and report.seconds > 0 and report.images_per_s > 0
    assert math.isfinite(report.train_loss) and 0 <= report.train_accuracy <= 1
    metrics = trained.metrics()
    assert "state_dict" not in metrics and metrics["curve"][1]["epoch"] == 2


def test_same_seed_same_weights(data: DatasetTensors, trained) -> None:
    again = train(ARCH, data, SETTINGS, seed=0)
    assert again.final_val_accuracy == trained.final_val_accuracy
    assert [r.train_loss for r in again.curve] == [r.train_loss for r in trained.curve]
    assert again.state_dict.keys() == trained.state_dict.keys()
    for key, value in trained.state_dict.items():
        assert torch.equal(again.state_dict[key], value), key
    other = train(ARCH, data, SETTINGS, seed=1)
    assert not torch.equal(other.state_dict["fc.weight"], trained.state_dict["fc.weight"])


def test_weights_reload_and_reproduce_accuracy(
    data: DatasetTensors, trained, tmp_path: Path
) -> None:
    storages = set()
    for value in trained.state_dict.values():
        assert value.device.type == "cpu" and value.is_contiguous()
        storages.add(value.untyped_storage().data_ptr())
    assert len(storages) == len(trained.state_dict)  # no shared storage
    save_file(trained.state_dict, tmp_path / "weights.safetensors")
    model = build_model(ARCH, data.num_classes, data.in_channels)
    model.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    _, accuracy = evaluate(model, data.val_x, data.val_y, data)
    assert accuracy == trained.final_val_accuracy
    assert model.training  # evaluate restores the mode it found
    _, test_accuracy = evaluate(model, data.test_x, data.test_y, data)
    assert test_accuracy == trained.test_accuracy


def test_nonfinite_loss_fails_the_trial() -> None:
    poisoned = make_data(std=0.0)  # normalising divides by zero: inf and nan inputs
    with pytest.raises(TrialFailed, match=r"loss is nan at epoch 1 step 1$") as caught:
        train(ARCH, poisoned, SETTINGS, seed=0)
    assert caught.value.reason == "loss is nan at epoch 1 step 1"


def test_on_epoch_sees_every_epoch_and_can_stop(data: DatasetTensors) -> None:
    seen: list[EpochReport] = []

    def on_epoch(report: EpochReport) -> None:
        seen.append(report)
        if report.epoch == 2:
            raise StopTraining("pruned")

    settings = TrainingSpec(epochs=3, batch_size=64, lr=0.05)
    result = train(ARCH, data, settings, seed=0, on_epoch=on_epoch)
    assert [r.epoch for r in seen] == [1, 2]
    assert result.stopped == "pruned" and result.epochs_run == 2
    assert result.curve == seen and result.test_accuracy is None
    assert result.final_val_accuracy == seen[-1].val_accuracy
    assert result.state_dict  # the final weights are kept


def test_streaming_data_trains_through_its_loaders(tmp_path: Path) -> None:
    x, y = tinted(40, 0)
    samples = []
    for i, (image, label) in enumerate(zip(x, y.tolist(), strict=True)):
        path = tmp_path / f"{i}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy().astype(np.uint8)).save(path)
        samples.append((str(path), label))
    files = ImageFiles(samples, size=16, channels=3)
    data = StreamingData(
        "imagefolder", files.subset(torch.arange(32)), files.subset(torch.arange(32, 40)),
        None, CLASSES, 3, 16, (0.4,) * 3, (0.3,) * 3, num_workers=0,
    )  # fmt: skip
    settings = TrainingSpec(epochs=2, batch_size=16, lr=0.05)
    result = train(Architecture("cifar_resnet20", "none"), data, settings, seed=0)
    assert result.epochs_run == 2 and result.test_accuracy is None
    assert result.images_per_s == pytest.approx(2 * 32 / result.wall_time_s)
    again = train(Architecture("cifar_resnet20", "none"), data, settings, seed=0)
    assert again.final_val_accuracy == result.final_val_accuracy


# -- the pieces ------------------------------------------------------------------------------


def test_lr_schedules() -> None:
    assert [lr_factor(s, 10, 2, "constant") for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == 1.0
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert [lr_factor(s, 8, 0, "step") for s in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )


def test_weight_decay_only_on_conv_and_linear_weights() -> None:
    model = build_model(ARCH, 10)
    decayed, plain = make_optimizer(model, TrainingSpec()).param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim > 1 for p in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"bn1.weight", "bn1.bias", "fc.bias"}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    adamw = make_optimizer(model, TrainingSpec(optimizer="adamw", nesterov=False))
    assert isinstance(adamw, torch.optim.AdamW)


def test_tune_allocator_is_safe_to_call_twice() -> None:
    assert tune_allocator() == tune_allocator()
    assert isinstance(tune_allocator(), bool)


def test_crop_is_a_shift_with_zero_padding() -> None:
    x = torch.randint(1, 256, (3, 2, 8, 8), dtype=torch.uint8)
    top, left = torch.tensor([4, 0, 8]), torch.tensor([4, 8, 1])
    out = crop(x, top, left, padding=4)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[0], x[0])  # the centre window: no shift
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(3):
        row, col = int(top[i]), int(left[i])
        assert torch.equal(out[i], padded[i, :, row : row + 8, col : col + 8])
    # window at the top: the image moves down by 4 rows, zeros come in above
    assert torch.equal(out[1, :, 4:, :4], x[1, :, :4, 4:])
    assert (out[1, :, :4] == 0).all() and (out[1, :, :, 4:] == 0).all()


def test_mirror_flips_the_masked_samples() -> None:
    x = torch.rand(4, 3, 5, 7)
    out = mirror(x, torch.tensor([True, False, True, False]))
    reversed_columns = torch.arange(6, -1, -1)
    assert torch.equal(out[0], x[0][..., reversed_columns])
    assert torch.equal(out[2], x[2][..., reversed_columns])
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_augment_is_seeded_and_fixed_in_ops_per_batch() -> None:
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)

    def run(batch: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return augment(batch, 4, True, torch.Generator().manual_seed(seed))

    assert torch.equal(run(x), run(x)) and not torch.equal(run(x), run(x, 1))
    flips = augment(x, 0, True, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(flips[i], x[i].flip(-1)) for i in range(64)]
    assert all(m or torch.equal(flips[i], x[i]) for i, m in enumerate(mirrored))
    assert 10 < sum(mirrored) < 54

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for batch in (x[:2], x):
        with CountOps() as mode:
            run(batch)
        counts.append(mode.ops)
    assert counts[0] == counts[1]  # the same ops for 2 samples as for 64: no per-sample loop


def test_to_float_normalises_in_the_requested_layout() -> None:
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = to_float(x, *normalizer(mean, std, "cpu"), torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = (x / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


# -- the fast recipe --------------------------------------------------------------------------


def test_the_fast_recipe_fills_what_the_spec_leaves_out() -> None:
    fast = TrainingSpec.from_dict({"recipe": "fast", "epochs": 10})
    assert (fast.label_smoothing, fast.schedule, fast.warmup_epochs) == (0.2, "linear", 2)
    assert fast.ema_decay == 0.9 and fast.flip_mode == "alternating"
    mine = TrainingSpec.from_dict({"recipe": "fast", "epochs": 3, "label_smoothing": 0.0})
    assert mine.label_smoothing == 0.0 and mine.warmup_epochs == 0  # a fifth of 3 epochs
    assert TrainingSpec.from_dict(fast.to_dict()) == fast
    plain = TrainingSpec()
    assert plain.recipe == "default" and plain.ema_decay is None and plain.flip_mode == "random"
    with pytest.raises(InvalidValue) as caught:
        TrainingSpec.from_dict({"recipe": "airbench"})
    assert caught.value.field == "training.recipe" and "fast" in str(caught.value)


def test_the_linear_schedule_is_a_triangle_with_its_warm_up() -> None:
    assert [lr_factor(s, 10, 2, "linear") for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    )


def test_alternating_flips_show_each_image_both_ways_every_two_epochs() -> None:
    x = torch.arange(2 * 1 * 1 * 4, dtype=torch.uint8).view(2, 1, 1, 4)
    first = torch.tensor([True, False])
    one, two, three = (alternate(x, first, epoch) for epoch in (1, 2, 3))
    assert torch.equal(one[0], x[0].flip(2)) and torch.equal(one[1], x[1])
    assert torch.equal(two[0], x[0]) and torch.equal(two[1], x[1].flip(2))
    assert torch.equal(three, one)


def test_the_weight_average_is_what_is_validated_and_stored(data: DatasetTensors) -> None:
    settings = TrainingSpec.from_dict({"recipe": "fast", "epochs": 2, "batch_size": 64, "lr": 0.05})
    result = train(ARCH, data, settings, seed=0)
    model = build_model(ARCH, data.num_classes, data.in_channels)
    model.load_state_dict(result.state_dict)
    _, accuracy = evaluate(model, data.val_x, data.val_y, data)
    assert accuracy == result.final_val_accuracy  # the stored weights are the averaged ones
    _, test_accuracy = evaluate(model, data.test_x, data.test_y, data)
    assert test_accuracy == result.test_accuracy
    plain = train(ARCH, data, settings.model_copy(update={"ema_decay": None}), seed=0)
    assert not torch.equal(plain.state_dict["fc.weight"], result.state_dict["fc.weight"])
    # The batch-norm statistics are averaged too (use_buffers).
    assert not torch.equal(
        plain.state_dict["bn1.running_mean"], result.state_dict["bn1.running_mean"]
    )
    again = train(ARCH, data, settings, seed=0)  # still deterministic per seed
    assert torch.equal(again.state_dict["fc.weight"], result.state_dict["fc.weight"])


# -- the step on static tensors (training.cuda_graphs), eagerly on the CPU ---------------------


def test_the_static_step_trains_as_the_usual_one(data: DatasetTensors, trained) -> None:
    """The same batches, learning rates and arithmetic through fixed buffers and a fused
    optimizer: the same curve, and weights equal to float rounding (fused SGD rounds
    differently from the per-tensor loop)."""
    static = train(ARCH, data, SETTINGS.model_copy(update={"cuda_graphs": True}), seed=0)
    assert [r.val_accuracy for r in static.curve] == [r.val_accuracy for r in trained.curve]
    assert [r.train_accuracy for r in static.curve] == [r.train_accuracy for r in trained.curve]
    assert [r.train_loss for r in static.curve] == pytest.approx(
        [r.train_loss for r in trained.curve], rel=1e-4
    )
    assert [r.lr for r in static.curve] == [r.lr for r in trained.curve]
    for key, value in trained.state_dict.items():
        assert torch.allclose(static.state_dict[key].double(), value.double(), atol=1e-3), key
    assert static.test_accuracy == trained.test_accuracy


def test_the_static_steps_buffers_and_learning_rates_stay_put() -> None:
    """What a CUDA graph needs: every call trains on the same input buffers and reads its
    learning rates from the same device tensors, filled in place; the epoch's sums are read
    once and zeroed. On the CPU nothing is captured."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, CLASSES))
    optimizer = make_optimizer(model, TrainingSpec(lr=0.1), fused=True)
    tensor_learning_rates(optimizer, torch.device("cpu"))
    step = StaticStep(model, optimizer, torch.device("cpu"), None, 0.0)
    x, y = torch.randn(8, 3, 2, 2), torch.arange(8) % CLASSES
    step(x, y, 0.1)
    assert step.x is not None and step.y is not None
    places = [step.x.data_ptr(), step.y.data_ptr()] + [
        g["lr"].data_ptr() for g in optimizer.param_groups
    ]
    before = [p.detach().clone() for p in model.parameters()]
    step(2 * x, y, 0.05)
    assert [step.x.data_ptr(), step.y.data_ptr()] + [
        g["lr"].data_ptr() for g in optimizer.param_groups
    ] == places
    assert torch.equal(step.x, 2 * x)
    assert all(float(g["lr"]) == pytest.approx(0.05) for g in optimizer.param_groups)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    loss_sum, correct, nonfinite = step.read()
    assert loss_sum > 0 and 0 <= correct <= 16 and not nonfinite
    assert step.read() == (0.0, 0, False)
    assert step.graph is None and step.steps == 2


def test_a_nonfinite_loss_fails_the_static_step_at_the_epochs_end() -> None:
    poisoned = make_data(std=0.0)
    settings = SETTINGS.model_copy(update={"cuda_graphs": True})
    with pytest.raises(TrialFailed, match=r"^the loss was not finite in epoch 1$"):
        train(ARCH, poisoned, settings, seed=0)


def test_where_the_static_step_cannot_run_the_usual_one_does_and_says_why(
    data: DatasetTensors, caplog: pytest.LogCaptureFixture
) -> None:
    averaged = SETTINGS.model_copy(update={"ema_decay": 0.9})
    usual = train(ARCH, data, averaged, seed=0)
    with caplog.at_level("WARNING", logger="workers.train"):
        asked = train(ARCH, data, averaged.model_copy(update={"cuda_graphs": True}), seed=0)
    assert "the usual step runs, since the weight average (ema_decay)" in caplog.text
    for key, value in usual.state_dict.items():
        assert torch.equal(asked.state_dict[key], value), key
    refusal = functools.partial(
        static_step_refusal, in_memory=True, scaler=False, ema=False, compiled=False
    )
    assert refusal() is None
    assert "streamed" in (refusal(in_memory=False) or "")
    assert "gradient scaler" in (refusal(scaler=True) or "")
    assert "torch.compile" in (refusal(compiled=True) or "")
