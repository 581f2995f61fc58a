"""Generated class patterns plus noise (``synthetic``): fast, for tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.data.base import Images, LoadRequest, loads, stream_generator, to_uint8


@loads("synthetic")
def load_synthetic(request: LoadRequest) -> Images:
    """Each class a smooth random pattern; each image its class's pattern plus uniform noise."""
    size = request.option("size")
    channels = request.option("channels")
    num_classes = request.option("num_classes")
    num_samples = request.option("num_samples")
    num_test = request.option("num_test", max(num_classes, num_samples // 4))
    seed = request.data_seed
    coarse = torch.rand(num_classes, channels, 4, 4, generator=stream_generator(seed, 0))
    patterns = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def sample(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=generator)]
        noise = torch.rand(count, channels, size, size, generator=generator)
        return to_uint8(255 * (0.6 * patterns[labels] + 0.4 * noise)), labels

    train_x, train_y = sample(num_samples, stream_generator(seed, 1))
    test_x, test_y = sample(num_test, stream_generator(seed, 2))
    return Images(train_x, train_y, test_x, test_y, num_classes)
