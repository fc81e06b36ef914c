"""SepViT against MODELS.md §2.4 (shapes, attention maps, parameter counts, tokens) and its own contracts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import pretrain.models  # noqa: F401  (registers the variants)
from pretrain.models import create_model
from pretrain.models.flops import count_macs, count_params
from pretrain.models.sepvit import SeparableAttention, SepViT
from pretrain.models.sepvit_windows import fit_window_sizes, stage_resolutions

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

# MODELS.md §2.4, measured on an independent re-implementation: params (M) and GMACs at 224x224, 1000 classes.
EXPECTED = {
    "sepvit_lite": (3.66, 0.57),
    "sepvit_tiny": (31.18, 4.52),
    "sepvit_small": (46.57, 7.46),
    "sepvit_base": (82.38, 13.05),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; small inputs gain nothing from more threads
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lite224() -> SepViT:
    torch.manual_seed(0)
    return create_model("sepvit_lite").eval()


def _lite32_config() -> dict:
    return yaml.safe_load((CONFIGS / "sepvit_lite_32.yaml").read_text())


def _lite32(**overrides) -> SepViT:
    cfg = _lite32_config()
    kw = dict(num_classes=10, img_size=cfg["img_size"], drop_path_rate=cfg["drop_path_rate"], **cfg["kwargs"])
    return create_model(cfg["name"], **{**kw, **overrides})


def _blocks(model: SepViT) -> list:
    return [blk for stage in model.stages for blk in stage.blocks]


def test_feature_maps_and_logits_at_224(lite224):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        maps = lite224.forward_intermediates(x)
        feats = lite224.forward_features(x)
        logits = lite224.forward_head(feats)
        pooled = lite224.forward_head(feats, pre_logits=True)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 56, 56), (2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7)]
    assert feats.shape == (2, 49, 256)
    assert pooled.shape == (2, 256)
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(lite224(x), logits, rtol=0, atol=0)


def test_attention_maps_at_224(lite224):
    lite224.set_keep_attn(True)
    try:
        with torch.no_grad():
            lite224(torch.randn(1, 3, 224, 224))
        attns = [blk.attn for blk in _blocks(lite224)]
        dwa = [tuple(a.last_dwa_attn.shape) for a in attns]
        pwa = [None if a.last_pwa_attn is None else tuple(a.last_pwa_attn.shape) for a in attns]
        # (B, N_w, heads, L, L): L = w*w + 1 with a window token, H*W for a single global window
        assert dwa == [
            (1, 64, 1, 50, 50),  # stage 1, w = 7
            (1, 16, 2, 50, 50),  # stage 2, w = 7
            (1, 4, 2, 197, 197),  # stage 2, w = 14 (a 2x2 group of 7x7 windows)
            *[(1, 4, 4, 50, 50), (1, 1, 4, 196, 196)] * 3,  # stage 3 alternates w = 7 and a global w = 14
            (1, 1, 8, 49, 49),  # stage 4: 7x7 is global
            (1, 1, 8, 49, 49),
        ]
        # (B, heads, N_w, N_w)
        assert pwa == [(1, 1, 64, 64), (1, 2, 16, 16), (1, 2, 4, 4), *[(1, 4, 4, 4), None] * 3, None, None]
        for a in attns:
            for m in (a.last_dwa_attn, a.last_pwa_attn):
                if m is not None:
                    assert (m >= 0).all()
                    torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-5)
    finally:
        lite224.set_keep_attn(False)
    assert all(blk.attn.last_dwa_attn is None for blk in _blocks(lite224))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_and_macs_match_the_table(name):
    with torch.device("meta"):  # shapes only: counting the 82M-parameter base takes well under a second
        model = create_model(name)
    params_m, gmacs = EXPECTED[name]
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.01)
    assert count_macs(model, 224) == pytest.approx(gmacs, rel=0.01)


def test_window_tokens(lite224):
    blocks = _blocks(lite224)
    assert lite224.stages[0].blocks[0].win_tokens.shape == (1, 64, 1, 32)
    assert [b.num_windows for b in blocks] == [64, 16, 4, 4, 1, 4, 1, 4, 1, 1, 1]
    for b in blocks:
        if b.num_windows == 1:
            assert b.win_tokens is None
            assert not any("win_tokens" in n or "pwa" in n for n, _ in b.named_parameters())
        else:
            assert b.win_tokens.shape == (1, b.num_windows, 1, b.norm1.normalized_shape[0])
            assert torch.count_nonzero(b.win_tokens) == 0  # zero init
    names = dict(lite224.named_parameters())
    nwd = lite224.no_weight_decay()
    assert nwd <= set(names)
    assert len(nwd) == sum(b.num_windows > 1 for b in blocks) == 6


def test_sdpa_path_matches_explicit_path():
    torch.manual_seed(0)
    model = _lite32(drop_path_rate=0.0).eval()
    with torch.no_grad():  # non-zero tokens and biases so that nothing is hidden by zero inits
        for n, p in model.named_parameters():
            if p.ndim == 1 or n.endswith("win_tokens"):
                p.normal_(0.0, 0.1)
    x = torch.randn(3, 3, 32, 32)
    fast = model(x)
    model.set_keep_attn(True)
    explicit = model(x)
    model.set_keep_attn(False)
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)
    # the 224 plan has multi-head windows with tokens, 197-token groups and global blocks
    model224 = create_model("sepvit_lite", num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fast = model224(x)
        model224.set_keep_attn(True)
        explicit = model224(x)
    assert fast.shape == (1, 256)
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-5)


def test_window_size_that_does_not_divide_the_stage_is_an_error():
    with pytest.raises(ValueError) as e:
        create_model("sepvit_lite", img_size=32)  # the official 7x7 windows on an 8x8 stage-1 map
    msg = str(e.value)
    assert "window_sizes[0][0]=7 (stage 1, block 0)" in msg
    assert "8x8" in msg and "img_size=32" in msg
    assert "(1, 2, 4, 8)" in msg  # sizes that work
    assert "window_sizes=[[4], [4, 4], [2, 2, 2, 2, 2, 2], [1, 1]]" in msg  # a whole plan that works
    with pytest.raises(ValueError, match=r"window_sizes\[1\]\[1\]=3 \(stage 2, block 1\).*4x4"):
        create_model("sepvit_lite", img_size=32, window_sizes=[[4], [2, 3], 2, 1])
    with pytest.raises(ValueError, match="one entry per stage"):
        create_model("sepvit_lite", img_size=32, window_sizes=[4, 2, 2])
    with pytest.raises(ValueError, match=r"window_sizes\[2\] \(stage 3\) needs 6 sizes"):
        create_model("sepvit_lite", img_size=32, window_sizes=[4, 2, [2, 2], 1])


def test_large_windows_are_clamped_to_the_stage():
    model = create_model("sepvit_lite", img_size=32, window_sizes=[[4], [2, 14], 14, 7])
    assert model.window_sizes == [[4], [2, 4], [2] * 6, [1, 1]]
    assert [[b.num_windows for b in s.blocks] for s in model.stages] == [[4], [4, 1], [1] * 6, [1, 1]]
    assert stage_resolutions(32) == [8, 4, 2, 1]
    assert stage_resolutions(224) == [56, 28, 14, 7]


def test_fit_window_sizes():
    official = [[7], [7, 14], [7, 14] * 3, [7, 7]]
    depths = (1, 2, 6, 2)
    assert fit_window_sizes(official, depths, 224) == official
    assert fit_window_sizes(official, depths, 32) == [[4], [4, 4], [2] * 6, [1, 1]]
    assert fit_window_sizes(official, depths, 384) == [[6], [6, 12], [6, 12] * 3, [6, 6]]  # 96, 48, 24, 12
    model = create_model("sepvit_lite", img_size=32, window_sizes=fit_window_sizes(official, depths, 32))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_32x32_with_the_demo_config():
    cfg = _lite32_config()
    assert cfg["name"] == "sepvit_lite" and cfg["img_size"] == 32
    torch.manual_seed(0)
    model = _lite32().train()
    # PWA is exercised: stage 1 has 4 windows, stage 2 alternates 4 windows with a global one
    assert [[b.num_windows for b in s.blocks] for s in model.stages][:2] == [[4], [4, 1]]
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_configs_load_and_build(tmp_path):
    from pretrain.config import load_config

    paths = sorted(CONFIGS.glob("sepvit_*.yaml"))
    assert {p.stem for p in paths} >= {"sepvit_lite", "sepvit_tiny", "sepvit_small", "sepvit_base", "sepvit_lite_32"}
    for path in paths:
        run = tmp_path / f"{path.stem}.yaml"
        run.write_text(yaml.safe_dump({"base": {"model": str(path)}}))
        cfg = load_config(run).model  # the schema accepts the file
        assert cfg.name == re.sub(r"_\d+$", "", path.stem), path  # sepvit_lite_32.yaml, sepvit_lite_64.yaml, ...
        with torch.device("meta"):
            model = create_model(cfg.name, img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate, **cfg.kwargs)
        assert model.img_size == cfg.img_size


def test_other_input_sizes_are_refused():
    model = _lite32()
    with pytest.raises(ValueError, match=r"built for 32x32 inputs.*got shape \(1, 3, 64, 64\).*img_size=64"):
        model(torch.randn(1, 3, 64, 64))


def test_unknown_kwargs_list_the_accepted_ones():
    with pytest.raises(ValueError, match=r"sepvit_tiny: unknown keyword argument\(s\) \['window_size'\]; accepted: .*"):
        create_model("sepvit_tiny", window_size=7)
    with pytest.raises(ValueError, match="window_sizes, in_chans, proj_drop_rate"):
        create_model("sepvit_tiny", window_size=7)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _lite32(drop_path_rate=0.1).train()  # stochastic depth on: the recompute must replay the RNG
    x = torch.randn(2, 3, 32, 32)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    ckpt = grads()
    model.set_grad_checkpointing(False)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_separable_attention_single_window_has_no_pwa():
    attn = SeparableAttention(16, 2, use_pwa=False)
    assert not hasattr(attn, "pwa_qk")
    x = torch.randn(2, 1, 9, 16)
    assert attn(x).shape == (2, 1, 9, 16)
