"""CPU transforms (decode, crop, flip) and the batched device-side augmentation."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import sysconfig
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from data_pipeline import augment, transforms
from data_pipeline.augment import DeviceAugment, normalize, soft_targets
from data_pipeline.config import AugmentConfig
from data_pipeline.errors import CorruptSample
from data_pipeline.transforms import (
    EvalTransform,
    TrainTransform,
    build_transforms,
    center_crop_box,
    decode_rgb,
    random_resized_crop_box,
)

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


@pytest.mark.parametrize("roi_decoding", [True, False], ids=["roi", "full-decode"])
def test_corrupt_bytes_raise_corrupt_sample(jpeg: bytes, roi_decoding: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not roi_decoding:
        monkeypatch.setattr(transforms, "_jpeg_roi", None)
    cases = {
        b"definitely not an image": "decode_error",
        jpeg[: len(jpeg) // 2]: "decode_error",  # truncated JPEG
        jpeg[: len(jpeg) * 3 // 4]: "decode_error",  # truncated below most small crops: caught all the same
        encode(np.zeros((8, 8, 3), np.uint8), "PNG")[:-30]: "decode_error",  # PNG missing its end
        b"": "missing_image",
    }
    small_crops = TrainTransform(32, scale=(0.08, 0.1))
    for data, reason in cases.items():
        for t in (TrainTransform(32), EvalTransform(32), small_crops):
            for seed in range(4):
                with pytest.raises(CorruptSample) as info:
                    t(data, "jpg", np.random.default_rng(seed))
                assert info.value.reason == reason
    err = pickle.loads(pickle.dumps(CorruptSample("decode_error", "bad")))  # crosses DataLoader workers
    assert (err.reason, str(err)) == ("decode_error", "decode_error: bad")


# ------------------------------------------------------------------------------- region-of-interest JPEG decode

needs_roi = pytest.mark.skipif(transforms._jpeg_roi is None, reason="data_pipeline._jpeg_roi is not built")


def test_roi_extension_is_built_where_libjpeg_turbo_headers_are() -> None:
    """The extension is optional at install (a machine without the header still installs); CI notices a broken build."""
    include_dirs = ["/usr/include", "/usr/local/include", sysconfig.get_config_var("INCLUDEDIR") or ""]
    include_dirs += [d for var in ("CPATH", "C_INCLUDE_PATH") for d in os.environ.get(var, "").split(os.pathsep)]
    if not any(d and os.path.isfile(os.path.join(d, "jpeglib.h")) for d in include_dirs):
        pytest.skip("no jpeglib.h: the extension is not expected, crops use full-image decodes")
    assert transforms._jpeg_roi is not None, (
        "jpeglib.h is installed but data_pipeline._jpeg_roi is not built or does not import; "
        "`pip install --no-deps --no-build-isolation -v -e .` shows why"
    )


ROI_SIZES = [(500, 375), (375, 500), (333, 251), (17, 9)]  # (w, h): ImageNet-like, odd, smaller than one iMCU row


@pytest.fixture(scope="module")
def roi_jpegs() -> dict[str, bytes]:
    """Real photos in every chroma subsampling libjpeg-turbo upsamples differently, baseline and progressive, grey."""
    from sklearn.datasets import load_sample_images

    simplejpeg = pytest.importorskip("simplejpeg")
    out = {}
    for i, (w, h) in enumerate(ROI_SIZES):
        a = np.array(Image.fromarray(load_sample_images().images[i % 2]).resize((w, h), Image.BICUBIC))
        out |= {
            f"4:2:0 {w}x{h}": encode(a, "JPEG", quality=90, subsampling=2),
            f"4:2:2 {w}x{h}": encode(a, "JPEG", quality=90, subsampling=1),
            f"4:4:4 {w}x{h}": encode(a, "JPEG", quality=90, subsampling=0),
            f"4:2:0 progressive {w}x{h}": encode(a, "JPEG", quality=85, subsampling=2, progressive=True),
            f"4:4:0 {w}x{h}": simplejpeg.encode_jpeg(a, 90, colorsubsampling="440"),
            f"4:1:1 {w}x{h}": simplejpeg.encode_jpeg(a, 90, colorsubsampling="411"),
            f"grey {w}x{h}": encode(a[..., 1], "JPEG", quality=90),
        }
    return out


def roi_decode(data: bytes, box: tuple[int, int, int, int], scale: int) -> np.ndarray:
    """The box (in pixels of the image at 1/scale) as (h, w, 3) uint8, by the extension."""
    x, y, w, h = box
    rgb, offset, span = transforms._jpeg_roi.decode_roi(data, x, y, w, h, scale)
    return np.frombuffer(rgb, np.uint8).reshape(h, span, 3)[:, offset : offset + w]


@needs_roi
@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_roi_decode_equals_full_decode_cropped(roi_jpegs: dict[str, bytes], scale: int) -> None:
    """Exact, edges and corners included. libjpeg-turbo's fancy upsampling treats the ends of a cropped row as image
    edges (the first/last column of 4:2:2 and 4:2:0 crops differed by up to ~30 levels): the extension decodes 2
    more columns each side, so the box's pixels are those of a full decode (simplejpeg's, the fallback path)."""
    import simplejpeg

    rng = np.random.default_rng(scale)
    for name, data in roi_jpegs.items():
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        full = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale))
        H, W = full.shape[:2]  # ceil(size / scale)
        boxes = [(0, 0, W, H), (0, 0, 1, 1), (W - 1, H - 1, 1, 1), (0, H - 1, W, 1), (W - 1, 0, 1, H)]  # corners, edges
        for _ in range(12):  # anywhere, and narrow ones (a 1- or 2-column span changes libjpeg's upsampling)
            w, h = int(rng.integers(1, W + 1)), int(rng.integers(1, H + 1))
            if len(boxes) % 3 == 0:
                w = int(rng.integers(1, min(W, 3) + 1))
            boxes.append((int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1)), w, h))
        for x, y, w, h in boxes:
            np.testing.assert_array_equal(
                roi_decode(data, (x, y, w, h), scale),
                full[y : y + h, x : x + w],
                err_msg=f"{name} 1/{scale} {x, y, w, h}",
            )


@needs_roi
def test_roi_decode_raises_value_error_on_bad_input(photo: np.ndarray, jpeg: bytes) -> None:
    decode_roi = transforms._jpeg_roi.decode_roi
    sof = jpeg.index(b"\xff\xc0")  # baseline frame header: marker, length (2), precision (1), height (2), width (2)
    bomb = jpeg[: sof + 5] + (60000).to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    cmyk = encode(Image.fromarray(photo).convert("CMYK"), "JPEG")
    cases = {
        "not a JPEG": (b"definitely not an image", (0, 0, 1, 1, 1), "JPEG header"),
        "truncated inside the box": (jpeg[: len(jpeg) // 2], (0, 300, 20, 20, 1), "JPEG data"),
        "CMYK": (cmyk, (0, 0, 1, 1, 1), "CMYK"),
        "box outside the image": (jpeg, (495, 0, 10, 10, 1), "not inside"),
        "box outside the scaled image": (jpeg, (0, 0, 64, 64, 8), "not inside"),
        "scale": (jpeg, (0, 0, 1, 1, 3), "scale_denom"),
        "decompression bomb": (bomb, (0, 0, 1, 1, 1), "exceeds the limit"),
    }
    for name, (data, args, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            decode_roi(data, *args, max_pixels=2 * Image.MAX_IMAGE_PIXELS)
            pytest.fail(name)
    # the rows below the box are never read: a truncated file decodes above the cut, hence the transforms' EOI check
    assert roi_decode(jpeg[: len(jpeg) // 2], (0, 0, 20, 20), 1).shape == (20, 20, 3)
    with pytest.raises(CorruptSample):
        TrainTransform(32)(bomb, "jpg", np.random.default_rng(0))


@needs_roi
def test_roi_decode_gives_the_same_pixels_from_threads(jpeg: bytes) -> None:
    """The GIL is released while decoding: concurrent decodes share no state."""
    boxes = [(x, y, 100, 80) for x in (0, 133, 400) for y in (0, 151, 295)] * 3
    with ThreadPoolExecutor(4) as pool:
        crops = list(pool.map(lambda box: roi_decode(jpeg, box, 1), boxes))
    for box, crop in zip(boxes, crops):
        np.testing.assert_array_equal(crop, roi_decode(jpeg, box, 1))


@needs_roi
@pytest.mark.parametrize("encoding", ["4:2:0", "4:4:4", "4:2:0 progressive", "grey"])
def test_transforms_give_the_same_crops_with_and_without_roi_decoding(
    photo: np.ndarray, encoding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = {"grey": {}, "4:4:4": {"subsampling": 0}, "4:2:0": {"subsampling": 2}}.get(
        encoding, {"subsampling": 2, "progressive": True}
    )
    big = np.asarray(Image.fromarray(photo).resize((1600, 1200), Image.BICUBIC))
    images = [photo, photo[:251, :333], big]  # ImageNet-like, odd, large (crops decoded at 1/2, 1/4, 1/8)
    if encoding == "grey":
        images = [a[..., 1] for a in images]
    datas = [encode(a, "JPEG", quality=90, **kw) for a in images]
    pipelines = [TrainTransform(224), TrainTransform(64), EvalTransform(224), EvalTransform(64, crop_ratio=0.9)]
    reductions = []  # DCT scales the crops were decoded at

    def reduction(box: tuple[int, int, int, int], out_size: int, _reduction=transforms._reduction) -> int:
        reductions.append(_reduction(box, out_size))
        return reductions[-1]

    monkeypatch.setattr(transforms, "_reduction", reduction)

    def crops() -> list[torch.Tensor]:
        return [t(d, "jpg", np.random.default_rng([7, s])) for d in datas for t in pipelines for s in range(6)]

    with monkeypatch.context() as m:
        m.setattr(transforms._Image, "decode", None)  # no full decode: every crop here comes from the ROI decoder
        with_roi = crops()
    assert set(reductions) == {1, 2, 4, 8}
    monkeypatch.setattr(transforms, "_jpeg_roi", None)
    for a, b in zip(with_roi, crops(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decoder", ["roi", "full-decode", "pillow"])
def test_out_gets_the_pixels_the_transform_returns(
    photo: np.ndarray, jpeg: bytes, decoder: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``out=`` (the stream's batch row) holds exactly the crop returned without it: flipped or not, resized or not."""
    if decoder == "roi":
        if transforms._jpeg_roi is None:
            pytest.skip("data_pipeline._jpeg_roi is not built")
        monkeypatch.setattr(transforms._Image, "decode", None)  # every crop below comes from the ROI decoder
    else:
        monkeypatch.setattr(transforms, "_jpeg_roi", None)
    data = encode(photo, "PNG") if decoder == "pillow" else jpeg
    square = encode(photo[:224, :224], "PNG" if decoder == "pillow" else "JPEG", quality=90)
    cases = [  # (transform, data): flips, no flips, a crop that needs no resize (224 of a 224x224 image)
        (TrainTransform(64, hflip=1.0), data),
        (TrainTransform(64, hflip=0.0), data),
        (TrainTransform(96), data),
        (EvalTransform(64), data),
        (EvalTransform(224, crop_ratio=1.0), square),
        (TrainTransform(224, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0), square),
    ]
    for t, payload in cases:
        size = t.img_size
        for seed in range(3):
            returned = t(payload, "jpg", np.random.default_rng([7, seed]))
            batch = torch.full((2, 3, size, size), 0xAB, dtype=torch.uint8)  # a row of a batch, not yet written
            written = t(payload, "jpg", np.random.default_rng([7, seed]), out=batch[1])
            assert written.data_ptr() == batch[1].data_ptr(), t
            assert torch.equal(batch[1], returned), (t, seed)
            assert (batch[0] == 0xAB).all()  # the neighbouring row is untouched
    if decoder != "roi":  # CorruptSample leaves ``out`` as it was
        row = torch.full((3, 64, 64), 0xAB, dtype=torch.uint8)
        with pytest.raises(CorruptSample):
            TrainTransform(64)(b"not an image", "jpg", np.random.default_rng(0), out=row)
        assert (row == 0xAB).all()
    for bad in (torch.empty(3, 64, 65, dtype=torch.uint8), torch.empty(3, 64, 64, dtype=torch.float32)):
        with pytest.raises(ValueError, match=r"out must be a CPU uint8 tensor \(3, 64, 64\)"):
            EvalTransform(64)(data, "jpg", out=bad)


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


REFERENCE_CONFIGS = {
    "imagenet": AugmentConfig(color_jitter=0.4),
    "defaults": AugmentConfig(),
    "3 ops, wide magnitudes, all erased": AugmentConfig(randaug_n=3, randaug_mstd=3.0, random_erasing=1.0),
    "randaug only": AugmentConfig(mixup_alpha=0.0, cutmix_alpha=0.0, random_erasing=0.0, label_smoothing=0.0),
}


def reference_batches(batch: tuple[torch.Tensor, torch.Tensor]):
    """Photo crops, random pixels with a flat image, a non-square odd size and one too small for the smoothing."""
    images, labels = batch
    turned = images[..., :48, :48].transpose(2, 3)  # (8, 3, 48, 48)
    more = torch.cat([images.flip(3), images.flip(2), torch.cat([turned, turned[..., :16]], dim=3)])
    yield torch.cat([images, more]), torch.arange(32) % 8
    gen = torch.Generator().manual_seed(11)
    noisy = torch.randint(0, 256, (24, 3, 33, 17), dtype=torch.uint8, generator=gen)
    noisy[0] = 77  # a flat image: autocontrast and equalize leave it alone
    yield noisy, torch.arange(24) % 8
    yield torch.randint(0, 256, (9, 3, 2, 9), dtype=torch.uint8, generator=gen), torch.arange(9) % 8


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_grouped_ops_give_the_masked_reference_bit_for_bit(batch: tuple[torch.Tensor, torch.Tensor], name: str) -> None:
    """Each op on the images that drew it gives exactly what computing every op for the whole batch and selecting
    per image gave (the augmentation before issue 22, kept in tests/unit/augment_reference.py): same op choices, same
    magnitudes, same pixels and targets for the same generator seed."""
    from augment_reference import MaskedAugment

    cfg = REFERENCE_CONFIGS[name]
    for i, (images, labels) in enumerate(reference_batches(batch)):
        for seed in (3 * i, 3 * i + 1):
            want = MaskedAugment(cfg, num_classes=8)(images, labels, gen(seed))
            got = DeviceAugment(cfg, num_classes=8, impl="torch")(images, labels, gen(seed))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (name, tuple(images.shape), seed)


def test_each_op_runs_only_on_the_images_that_drew_it(
    batch: tuple[torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = dataclasses.replace(OFF, randaug_n=2)
    images = torch.cat([batch[0]] * 8)  # (64, 3, 48, 64)
    seen: list[tuple[str, int]] = []

    def spy(name, fn):
        def wrapped(x, *args):
            seen.append((name, x.shape[0]))
            return fn(x, *args)

        return wrapped

    for name, fn in list(augment._COLOUR_OPS.items()):
        monkeypatch.setitem(augment._COLOUR_OPS, name, spy(name, fn))
    monkeypatch.setattr(augment, "_affine", spy("geometric", augment._affine))
    DeviceAugment(cfg, num_classes=8, impl="torch")(images, torch.zeros(64, dtype=torch.long), gen(9))
    g, want = gen(9), []
    for _ in range(cfg.randaug_n):  # the draws again, from a generator seeded the same way
        op, _, _ = augment._ops_of_round(64, g, cfg)
        counts = {n: int((op == k).sum()) for k, n in enumerate(augment.RANDAUG_OPS)}
        want += [(n, counts[n]) for n in augment._COLOUR_OPS if counts[n]]
        geometric = sum(counts[n] for n in augment._GEOMETRIC)
        want += [("geometric", geometric)] if geometric else []
    assert seen == want
    assert sum(n for _, n in seen) < 2 * 64  # half the draws apply no op: those images are never computed
    assert len({name for name, _ in seen}) == 9  # every colour op and the geometric group ran


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
    images, _ = batch
    x = images.float() / 255
    names = list(augment.RANDAUG_OPS)
    chosen = {n: torch.ones(8, dtype=torch.bool) if n == "rotate" else torch.zeros(8, dtype=torch.bool) for n in names}
    theta = augment._affine_maps(chosen, torch.zeros(8), torch.ones(8), 48, 64)
    fill = torch.tensor(OFF.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(augment._affine(x, theta, fill), x, atol=1e-5, rtol=0)
    # a quarter turn of a square image at full magnitude is not the identity
    chosen["rotate"][:] = True
    theta = augment._affine_maps(chosen, torch.ones(8), torch.ones(8), 48, 48)
    assert (augment._affine(x[..., :48], theta, fill) - x[..., :48]).abs().mean() > 0.02
