"""The device augmentation's Triton path (``data_pipeline._augment_triton``) under Triton's interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated (when ``data_pipeline._augment_triton`` is first
imported), so it is set here, at collection. The torch path is the reference: it is itself checked bit for bit against
the augmentation that computed every op for the whole batch (tests/unit/test_transforms.py).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from data_pipeline import augment  # noqa: E402
from data_pipeline.augment import DeviceAugment  # noqa: E402
from pretrain.config import AugmentConfig  # noqa: E402
from pretrain.kernel_count import KernelCounter  # noqa: E402

pytestmark = pytest.mark.timeout(300)

IMAGENET = AugmentConfig(color_jitter=0.4)  # configs/run/imagenet_*.yaml's augment section
CASES = {
    "imagenet": (IMAGENET, (16, 20, 28)),
    "3 ops, wide magnitudes, all erased": (
        AugmentConfig(randaug_n=3, randaug_mstd=3.0, random_erasing=1.0, mixup_alpha=0.0, cutmix_alpha=0.0),
        (12, 17, 13),
    ),
    "jitter only": (AugmentConfig(randaug_n=0, mixup_alpha=0.0, cutmix_alpha=0.0), (6, 9, 11)),
    "normalise only": (AugmentConfig(randaug_n=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0), (3, 5, 7)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images_of(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Smooth random images (a blurred noise field, as photos are smooth), one of them flat."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, h // 4 + 2, w // 4 + 2, generator=g)
    images = (torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * 255).round().to(torch.uint8)
    images[0] = 90
    return images


def test_the_triton_path_matches_the_torch_path() -> None:
    drawn: set[int] = set()
    for i, (name, (cfg, (b, h, w))) in enumerate(CASES.items()):
        images, labels = images_of(b, h, w, i), torch.arange(b) % 8
        for seed in (i, 10 + i):
            want = DeviceAugment(cfg, num_classes=8, impl="torch")(images, labels, torch.Generator().manual_seed(seed))
            got = DeviceAugment(cfg, num_classes=8, impl="triton")(images, labels, torch.Generator().manual_seed(seed))
            # float32 rounding apart (reduction order, the affine grid's products): pixels within 2e-5 of 1/std
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=0, msg=f"{name}, seed {seed}")
            assert torch.equal(got[1], want[1])
            g = torch.Generator().manual_seed(seed)
            for _ in range(cfg.randaug_n):
                drawn |= set(augment._ops_of_round(b, g, cfg)[0].tolist())
    assert drawn == set(range(-1, len(augment.RANDAUG_OPS)))  # every op (and no op) was drawn at least once


def test_launches_per_batch_do_not_depend_on_the_batch_and_stay_within_30() -> None:
    counts = {}
    for b in (8, 24):
        aug = DeviceAugment(IMAGENET, num_classes=1000, impl="triton")
        images, labels = images_of(b, 8, 8, b), torch.arange(b)
        for seed, kind in ((1, "mixup"), (2, "cutmix")):
            with KernelCounter() as counter:
                aug(images, labels, torch.Generator().manual_seed(seed))
            counts[b, kind] = counter.count
    for kind in ("mixup", "cutmix"):
        small, large = counts[8, kind], counts[24, kind]
        assert small.by_op == large.by_op and small.host_reads == large.host_reads == []
        # 2 RandAugment rounds x (4 draws + stats + apply), jitter (draw + stats + apply), erasing's 3 draws,
        # the targets, and the mixing
        assert large.by_op["randaug_stats"] == 2 and large.by_op["augment_apply"] == 3
        assert large.kernels <= 30, large.by_op
    assert counts[24, "mixup"].kernels == 28 and counts[24, "cutmix"].kernels == 27


def test_auto_takes_the_torch_path_on_cpu_and_triton_needs_its_tensors() -> None:
    images = images_of(2, 8, 8, 0)
    assert DeviceAugment(IMAGENET, num_classes=8).path(images) == "torch"
    assert DeviceAugment(IMAGENET, num_classes=8, impl="triton").path(images) == "triton"
    with pytest.raises(ValueError, match="impl='fast'"):
        DeviceAugment(dataclasses.replace(IMAGENET), num_classes=8, impl="fast")
