"""CPU transforms (decode, crop, flip) and the batched device-side augmentation."""

from __future__ import annotations

import dataclasses
import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from data_pipeline import augment, transforms
from data_pipeline.augment import DeviceAugment, normalize, soft_targets
from data_pipeline.errors import CorruptSample
from data_pipeline.transforms import (
    EvalTransform,
    TrainTransform,
    build_transforms,
    center_crop_box,
    decode_rgb,
    random_resized_crop_box,
)
from pretrain.config import AugmentConfig

pytestmark = pytest.mark.timeout(120)

OFF = AugmentConfig(randaug_n=0, color_jitter=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0,
                    label_smoothing=0.0)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a shared 2-core machine: intra-op threads only spin against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode(arr: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real photograph, 500x375 (ImageNet-like)."""
    from sklearn.datasets import load_sample_images

    return np.array(Image.fromarray(load_sample_images().images[0]).resize((500, 375)))  # (375, 500, 3)


@pytest.fixture(scope="module")
def jpeg(photo: np.ndarray) -> bytes:
    return encode(photo, "JPEG", quality=90)


@pytest.fixture(scope="module")
def batch(photo: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """8 uint8 crops (8, 3, 48, 64) of the photo with labels 0..7."""
    crops = [photo[40 * i : 40 * i + 48, 50 * i : 50 * i + 64] for i in range(8)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), torch.arange(8)


# ------------------------------------------------------------------------------------------------- CPU transforms


def test_every_format_gives_uint8_rgb_crops(photo: np.ndarray, jpeg: bytes) -> None:
    small = photo[:90, :120]
    rgba = np.concatenate([small, np.full((90, 120, 1), 128, np.uint8)], axis=-1)
    palette = Image.fromarray(small).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    payloads = {
        "jpg": jpeg,
        "grey.png": encode(small[..., 0], "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "palette.png": encode(palette, "PNG", transparency=0),
        "cmyk.jpg": encode(Image.fromarray(small).convert("CMYK"), "JPEG"),
        "grey.jpg": encode(small[..., 1], "JPEG"),
        "webp": encode(small, "WEBP"),
    }
    train, evaluate = TrainTransform(40), EvalTransform(40)
    for name, data in payloads.items():
        for out in (train(data, name, np.random.default_rng(0)), evaluate(data, name)):
            assert out.shape == (3, 40, 40) and out.dtype == torch.uint8 and out.is_contiguous(), name
        assert decode_rgb(data).shape[:2] == ((375, 500) if name == "jpg" else (90, 120)), name
    grey = evaluate(payloads["grey.png"], "png")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    cmyk = evaluate(payloads["cmyk.jpg"], "jpg").float().mean((1, 2))
    rgb = evaluate(encode(small, "JPEG"), "jpg").float().mean((1, 2))
    assert torch.allclose(cmyk, rgb, atol=12)  # CMYK converted back to the same colours


def test_train_transform_randomness_comes_only_from_the_rng(jpeg: bytes) -> None:
    t = TrainTransform(64)
    a = t(jpeg, "jpg", np.random.default_rng([1, 0, 5]))
    torch.manual_seed(123)  # global state must not matter
    np.random.seed(123)
    b = t(jpeg, "jpg", np.random.default_rng([1, 0, 5]))
    c = t(jpeg, "jpg", np.random.default_rng([1, 0, 6]))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the flip draw comes after the crop draws: same crop, mirrored
    flipped = TrainTransform(64, hflip=1.0)(jpeg, "jpg", np.random.default_rng(9))
    straight = TrainTransform(64, hflip=0.0)(jpeg, "jpg", np.random.default_rng(9))
    assert torch.equal(flipped, straight.flip(-1))


def test_crops_match_pillow_on_the_same_box(photo: np.ndarray, jpeg: bytes) -> None:
    decoded = Image.fromarray(decode_rgb(jpeg))
    x, y, w, h = center_crop_box(500, 375, 224, 0.875)
    assert (w, h) == (328, 328) and (x, y) == (86, 23)  # shorter side 375 -> 256, keep 224 of it
    ours = EvalTransform(224)(jpeg, "jpg").permute(1, 2, 0).numpy().astype(float)
    ref = np.asarray(decoded.resize((224, 224), Image.BICUBIC, box=(x, y, x + w, y + h))).astype(float)
    assert np.abs(ours - ref).mean() < 0.5
    assert torch.equal(EvalTransform(224)(jpeg, "jpg"), EvalTransform(224)(jpeg, "jpg", np.random.default_rng(1)))
    # a full-image "crop" (scale and ratio pinned) is a plain resize of the whole photo
    whole = TrainTransform(192, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0, interpolation="bilinear")
    ours = whole(jpeg, "jpg", np.random.default_rng(0)).permute(1, 2, 0).numpy().astype(float)
    ref = np.asarray(decoded.resize((192, 192), Image.BILINEAR)).astype(float)
    assert np.abs(ours - ref).mean() < 1.0


def test_large_jpeg_decoded_at_reduced_dct_scale_stays_accurate(photo: np.ndarray) -> None:
    big = encode(np.asarray(Image.fromarray(photo).resize((1600, 1200), Image.BICUBIC)), "JPEG", quality=92)
    ours = EvalTransform(128, crop_ratio=1.0)(big, "jpg").permute(1, 2, 0).numpy().astype(float)  # 1/8 scale decode
    full = Image.open(io.BytesIO(big)).convert("RGB")
    ref = np.asarray(full.resize((128, 128), Image.BICUBIC, box=(200, 0, 1400, 1200))).astype(float)
    assert np.abs(ours - ref).mean() < 3.0


def test_pillow_fallback_decodes_like_simplejpeg(jpeg: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    if transforms.simplejpeg is None:
        pytest.skip("simplejpeg not installed: Pillow is already the only decoder")
    fast = TrainTransform(64)(jpeg, "jpg", np.random.default_rng(3)).float()
    monkeypatch.setattr(transforms, "simplejpeg", None)
    slow = TrainTransform(64)(jpeg, "jpg", np.random.default_rng(3)).float()
    assert (fast - slow).abs().mean() < 1.0


def test_corrupt_bytes_raise_corrupt_sample(jpeg: bytes) -> None:
    cases = {
        b"definitely not an image": "decode_error",
        jpeg[: len(jpeg) // 2]: "decode_error",  # truncated JPEG
        encode(np.zeros((8, 8, 3), np.uint8), "PNG")[:-30]: "decode_error",  # PNG missing its end
        b"": "missing_image",
    }
    for data, reason in cases.items():
        for t in (TrainTransform(32), EvalTransform(32)):
            with pytest.raises(CorruptSample) as info:
                t(data, "jpg", np.random.default_rng(0))
            assert info.value.reason == reason
    err = pickle.loads(pickle.dumps(CorruptSample("decode_error", "bad")))  # crosses DataLoader workers
    assert (err.reason, str(err)) == ("decode_error", "decode_error: bad")


def test_random_resized_crop_box_bounds_and_fallback() -> None:
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        x, y, w, h = random_resized_crop_box(500, 375, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x and 0 <= y and x + w <= 500 and y + h <= 375 and w > 0 and h > 0
        areas.append(w * h / (500 * 375))
    assert min(areas) < 0.15 and max(areas) > 0.8
    # impossible ratios fall back to the largest centred box with the ratio clamped
    assert random_resized_crop_box(100, 10, (0.9, 1.0), (1.0, 1.0), rng) == (45, 0, 10, 10)


def test_build_transforms_reads_the_config() -> None:
    cfg = AugmentConfig(scale_min=0.5, ratio_min=0.9, ratio_max=1.1, hflip=0.0, interpolation="bilinear")
    train, evaluate = build_transforms(dataclasses.replace(cfg, eval_crop_ratio=0.5), 32)
    assert (train.img_size, train.scale, train.ratio, train.hflip) == (32, (0.5, 1.0), (0.9, 1.1), 0.0)
    assert (evaluate.crop_ratio, evaluate.interpolation) == (0.5, "bilinear")


# ---------------------------------------------------------------------------------------------- device augment


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_device_augment_is_a_function_of_the_generator(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    aug = DeviceAugment(AugmentConfig(randaug_n=3, color_jitter=0.3), num_classes=10)
    x1, t1 = aug(images, labels, gen(5))
    torch.manual_seed(0)  # global RNG is not used
    x2, t2 = aug(images, labels, gen(5))
    x3, _ = aug(images, labels, gen(6))
    assert torch.equal(x1, x2) and torch.equal(t1, t2) and not torch.equal(x1, x3)
    assert x1.shape == (8, 3, 48, 64) and x1.dtype == torch.float32 and t1.shape == (8, 10)
    assert torch.isfinite(x1).all()
    torch.testing.assert_close(t1.sum(1), torch.ones(8))


def test_all_knobs_off_is_exactly_normalize(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    x, t = DeviceAugment(OFF, num_classes=8)(images, labels, gen(0))
    assert torch.equal(x, normalize(images, OFF.mean, OFF.std))
    assert torch.equal(t, torch.eye(8))
    manual = (images.float() / 255 - torch.tensor(OFF.mean).view(1, 3, 1, 1)) / torch.tensor(OFF.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, manual)


@pytest.mark.parametrize(
    "knob",
    [
        {"randaug_n": 2},
        {"color_jitter": 0.4},
        {"random_erasing": 1.0},
        {"mixup_alpha": 1.0},
        {"cutmix_alpha": 1.0},
    ],
    ids=lambda k: next(iter(k)),
)
def test_each_knob_switches_its_op(batch: tuple[torch.Tensor, torch.Tensor], knob: dict) -> None:
    images, labels = batch
    plain = normalize(images, OFF.mean, OFF.std)
    x, _ = DeviceAugment(dataclasses.replace(OFF, **knob), num_classes=8)(images, labels, gen(1))
    assert not torch.equal(x, plain)
    if "mixup_alpha" in knob or "cutmix_alpha" in knob:  # mix_prob=0 switches mixing off too
        off, t = DeviceAugment(dataclasses.replace(OFF, mix_prob=0.0, **knob), num_classes=8)(images, labels, gen(1))
        assert torch.equal(off, plain) and torch.equal(t, torch.eye(8))


def test_label_smoothing_mass() -> None:
    t = soft_targets(torch.tensor([0, 3]), num_classes=5, smoothing=0.1)
    torch.testing.assert_close(t[0], torch.tensor([0.92, 0.02, 0.02, 0.02, 0.02]))
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_mixup_blends_images_and_targets(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    cfg = dataclasses.replace(OFF, mixup_alpha=0.4, label_smoothing=0.1)
    x, t = DeviceAugment(cfg, num_classes=8)(images, labels, gen(2))
    smooth = soft_targets(labels, 8, 0.1)
    lam = float((t[0, 0] - smooth[7, 0]) / (smooth[0, 0] - smooth[7, 0]))  # image 0 is mixed with image 7
    assert 0.0 <= lam <= 1.0
    torch.testing.assert_close(t, lam * smooth + (1 - lam) * smooth.flip(0))
    plain = normalize(images, cfg.mean, cfg.std)
    torch.testing.assert_close(x, lam * plain + (1 - lam) * plain.flip(0))


def test_cutmix_pastes_a_box_with_matching_label_mass(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    for seed in range(4):
        x, t = DeviceAugment(dataclasses.replace(OFF, cutmix_alpha=1.0), num_classes=8)(images, labels, gen(seed))
        plain = normalize(images, OFF.mean, OFF.std)
        from_self = (x == plain).all(1)  # (B, H, W)
        from_other = (x == plain.flip(0)).all(1)
        assert (from_self | from_other).all()
        pasted = (~from_self[0]).float().mean()  # image 0 differs from image 7 everywhere the box is
        torch.testing.assert_close(t[0, 7], pasted, atol=0.02, rtol=0)
        torch.testing.assert_close(t[0, 0] + t[0, 7], torch.tensor(1.0))


def test_random_erasing_fills_one_box_per_image_with_noise(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    x, _ = DeviceAugment(dataclasses.replace(OFF, random_erasing=1.0), num_classes=8)(images, labels, gen(4))
    changed = (x != normalize(images, OFF.mean, OFF.std)).any(1)  # (B, H, W)
    for b in range(8):
        rows, cols = changed[b].nonzero(as_tuple=True)
        assert rows.numel() > 0
        box = changed[b, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.float().mean() > 0.95  # a filled rectangle
        frac = box.numel() / changed[b].numel()
        assert 0.015 < frac < 0.40
    noise = x[changed.unsqueeze(1).expand_as(x)]
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1.0) < 0.1


def test_randaugment_ops_match_pillow(photo: np.ndarray) -> None:
    img = photo[100:164, 200:264]  # (64, 64, 3)
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float() / 255  # (1, 3, 64, 64)

    def as_uint8(t: torch.Tensor) -> np.ndarray:
        return (t[0].permute(1, 2, 0) * 255).round().byte().numpy().astype(int)

    pil = Image.fromarray(img)
    np.testing.assert_array_equal(as_uint8(augment._equalize(x)), np.asarray(ImageOps.equalize(pil)))
    np.testing.assert_array_equal(
        as_uint8(augment._posterize(x, torch.tensor([3.0]))), np.asarray(ImageOps.posterize(pil, 5))
    )
    assert np.abs(as_uint8(augment._autocontrast(x)) - np.asarray(ImageOps.autocontrast(pil))).max() <= 1
    for factor in (0.3, 1.7):
        sharp = augment._blend(augment._smooth(x), x, torch.tensor([factor]))
        ref = np.asarray(ImageEnhance.Sharpness(pil).enhance(factor)).astype(int)
        assert np.abs(as_uint8(sharp) - ref).max() <= 2
        color = augment._blend(augment._grey(x), x, torch.tensor([factor]))
        ref = np.asarray(ImageEnhance.Color(pil).enhance(factor)).astype(int)
        assert np.abs(as_uint8(color) - ref).max() <= 2


def test_geometric_ops_keep_the_image_on_zero_magnitude(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = batch
    cfg = dataclasses.replace(OFF, randaug_n=4, randaug_m=0.0, randaug_mstd=0.0)
    aug = DeviceAugment(cfg, num_classes=8)
    x = images.float() / 255
    names = list(augment.RANDAUG_OPS)
    chosen = {n: torch.ones(8, dtype=torch.bool) if n == "rotate" else torch.zeros(8, dtype=torch.bool) for n in names}
    theta = aug._affine_maps(chosen, torch.zeros(8), torch.ones(8), 48, 64)
    fill = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(augment._affine(x, theta, fill), x, atol=1e-5, rtol=0)
    # a quarter turn of a square image at full magnitude is not the identity
    chosen["rotate"][:] = True
    theta = aug._affine_maps(chosen, torch.ones(8), torch.ones(8), 48, 48)
    assert (augment._affine(x[..., :48], theta, fill) - x[..., :48]).abs().mean() > 0.02
