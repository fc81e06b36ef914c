"""DeepSpeed config from the typed config, batch arithmetic, param groups, LR schedule, loss, optimizer and EMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_pipeline.config import ConfigError
from pretrain.config import load_config
from pretrain.engine import build_ds_config, check_batch_sizes, optimizer_state_bytes
from pretrain.loss import soft_target_cross_entropy
from pretrain.optim import ModelEMA, build_lr_lambda, build_optimizer, layer_ids, param_groups, uses_device_step


def cfg_with(*overrides):
    return load_config(None, list(overrides))


def test_ds_config_from_typed_config():
    cfg = cfg_with("data.batch_size=16", "trainer.grad_accum_steps=2", "deepspeed.zero_stage=3", "optim.grad_clip=1.5")
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.5
    assert ds["zero_allow_untested_optimizer"] is True
    assert "bf16" not in ds and "fp16" not in ds


def test_precision_and_offload():
    ds = build_ds_config(cfg_with("trainer.precision=bf16", "deepspeed.offload_optimizer=cpu"), 1)
    # DeepSpeed steps itself with offload (and ZeRO-3): the non-finite guard relies on its overflow check there
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and not uses_device_step(ds)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert build_ds_config(cfg_with("trainer.precision=fp16"), 1)["fp16"]["enabled"] is True
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        build_ds_config(cfg_with("deepspeed.zero_stage=0", "deepspeed.offload_optimizer=cpu"), 1)


def test_the_device_step_takes_zero_0_to_2_in_fp32_and_bf16():
    for stage in (0, 1, 2):
        for precision in ("fp32", "bf16"):
            ds = build_ds_config(cfg_with(f"deepspeed.zero_stage={stage}", f"trainer.precision={precision}"), 2)
            assert uses_device_step(ds), (stage, precision)
            if precision == "bf16":  # no per-tensor overflow loop: the device step checks the global norm
                assert ds["bf16"]["check_grad_overflow"] is False
    assert not uses_device_step(build_ds_config(cfg_with("deepspeed.zero_stage=3", "trainer.precision=bf16"), 2))
    assert build_ds_config(cfg_with("deepspeed.zero_stage=3", "trainer.precision=bf16"), 2)["bf16"][
        "check_grad_overflow"
    ]
    assert not uses_device_step(build_ds_config(cfg_with("trainer.precision=fp16", "trainer.device=cuda"), 2))
    overridden = cfg_with("trainer.precision=bf16", 'deepspeed.overrides={"data_types": {"grad_accum_dtype": "fp32"}}')
    assert not uses_device_step(build_ds_config(overridden, 2))


def test_overrides_merge_last_and_deep():
    cfg = cfg_with(
        "deepspeed.zero_stage=2",
        'deepspeed.overrides={"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 0.5}',
    )
    ds = build_ds_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 0.5


def test_global_batch_mismatch_names_the_factors_and_the_fix():
    cfg = cfg_with("data.batch_size=32", "trainer.global_batch_size=256")
    assert check_batch_sizes(cfg, 8) == 256
    with pytest.raises(ConfigError) as e:
        check_batch_sizes(cfg, 4)
    msg = str(e.value)
    assert "trainer.global_batch_size=256" in msg and "world size (4)" in msg
    assert "trainer.grad_accum_steps=2" in msg


def test_ema_with_zero3_is_refused():
    with pytest.raises(ConfigError, match="zero_stage <= 2"):
        build_ds_config(cfg_with("trainer.ema_decay=0.99", "deepspeed.zero_stage=3"), 1)


def test_param_groups_skip_decay_on_norms_biases_and_no_weight_decay():
    from pretrain.models import create_model

    model = create_model("sepvit_lite", num_classes=10, img_size=32, window_sizes=[[4], [2, 4], [2] * 6, [1, 1]])
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim > 1 for p in decay["params"])
    assert set(model.no_weight_decay()) <= no_decay_names
    assert any(n.endswith("bias") for n in no_decay_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["sepvit_lite", "setformer_lite"])
def test_layer_decay_places_every_parameter_by_depth(name):
    from pretrain.models import create_model

    model = create_model(name, num_classes=10)
    ids, blocks = layer_ids(model)
    assert blocks == sum(model_depths(model))  # every block of every stage
    assert set(ids) == {n for n, _ in model.named_parameters()}
    first = next(n for n in ids if n.startswith("stages.0.") and ".blocks." not in n)
    assert ids[first] == 0  # the stem
    assert {ids[n] for n in ids if n.startswith("stages.0.blocks.0.")} == {1}  # the first block
    last_stage = len(model_depths(model)) - 1
    last_block = next(n for n in ids if n.startswith(f"stages.{last_stage}.blocks.{model_depths(model)[-1] - 1}."))
    assert ids[last_block] == blocks
    assert ids["head.weight"] == ids["norm.weight"] == blocks + 1
    stage1_in = next(n for n in ids if n.startswith("stages.1.") and ".blocks." not in n)
    assert ids[stage1_in] == model_depths(model)[0]  # with the last block of stage 1 (1-based), before stage 2's

    groups = param_groups(model, 0.05, layer_decay=0.5)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    by_param = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_param[id(params["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(params[first])]["lr_scale"] == pytest.approx(0.5 ** (blocks + 1))
    assert by_param[id(params[last_block])]["lr_scale"] == pytest.approx(0.5)
    assert (
        by_param[id(params["head.bias"])]["weight_decay"] == 0.0
        and by_param[id(params["head.weight"])]["weight_decay"] == 0.05
    )
    scales = [g["lr_scale"] for g in groups]
    assert scales == sorted(scales)  # shallow layers first


def model_depths(model) -> list[int]:
    return [len(stage.blocks) for stage in model.stages]


def test_layer_decay_one_keeps_the_two_groups_and_bad_values_are_refused():
    from pretrain.models import create_model

    model = create_model("setformer_lite", num_classes=10)
    groups = param_groups(model, 0.05)
    assert [(g["weight_decay"], g["lr_scale"], g["decayed"]) for g in groups] == [(0.05, 1.0, True), (0.0, 1.0, False)]
    for bad in ("0", "1.5", "-0.2"):
        message = rf"optim.layer_decay={float(bad)} must be positive and finite, in \(0, 1\]"
        with pytest.raises(ConfigError, match=message):
            cfg_with(f"optim.layer_decay={bad}")


_LAYER_DECAY_ENGINE = """
import json, os, sys
import torch
from pretrain.config import load_config
from pretrain.distributed import init_distributed
from pretrain.engine import build_engine, reapply_optim_config
from pretrain.rank import build_model

cfg = load_config("configs/run/digits_sepvit_lite.yaml", sys.argv[1:])
dist = init_distributed(device="cpu")
parts = build_engine(cfg, build_model(cfg), dist.world_size)
out = []
for step in range(3):
    loss = parts.engine(torch.randn(4, 3, 32, 32)).square().mean()
    parts.engine.backward(loss)
    parts.engine.step()
    out.append([g["lr"] for g in parts.optimizer.param_groups])
changed = reapply_optim_config(parts, cfg)  # as after a resume with the same config: nothing changes
out.append([g["lr"] for g in parts.optimizer.param_groups])
plain = {"muon": "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules,
         "inductor": "torch._inductor.compile_fx" in sys.modules, "switch": os.environ.get("TORCHDYNAMO_DISABLE")}
print(json.dumps({"lrs": out, "specs": parts.group_specs, "changed": changed, "plain": plain}))
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_layer_decay_lrs_in_a_real_deepspeed_engine(stage):
    import json
    import subprocess
    import sys

    from conftest import REPO, train_env

    from pretrain.distributed import find_free_port

    overrides = ["optim.layer_decay=0.5", "optim.lr=1e-3", "schedule.warmup_steps=0", "schedule.name=constant",
                 f"deepspeed.zero_stage={stage}", "model.img_size=32", "trainer.device=cpu"]  # fmt: skip
    env = {**train_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(find_free_port())}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _LAYER_DECAY_ENGINE, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    scales = [scale for scale, _ in got["specs"]]
    assert len(scales) > 4 and scales[-1] == 1.0 and min(scales) < 0.01
    for lrs in got["lrs"]:  # what DeepSpeed's optimizer steps with, every step: lr x the group's scale
        assert lrs == pytest.approx([1e-3 * s for s in scales], rel=1e-9)
    assert got["changed"] == []
    # DeepSpeed's Muon module is loaded (its ZeRO optimizers check for Muon), without inductor, and Dynamo's switch is
    # as it was (see pretrain.engine._import_deepspeed_muon_uncompiled)
    assert got["plain"] == {"muon": True, "inductor": False, "switch": None}


def test_lr_schedule_warmup_then_cosine():
    cfg = cfg_with(
        "optim.lr=1e-3",
        "schedule.warmup_steps=10",
        "schedule.warmup_lr=1e-6",
        "schedule.min_lr=1e-5",
        "trainer.max_steps=110",
    )
    f = build_lr_lambda(cfg)
    lr = [1e-3 * f(s) for s in range(111)]
    assert lr[0] == pytest.approx(1e-6)
    assert lr[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert lr[10] == pytest.approx(1e-3)
    assert lr[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert lr[110] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_lr_schedule_state_follows_new_config_on_resume():
    """LambdaLR saves only the step for a closure, so a resumed run with a new max_steps uses the new schedule."""
    p = nn.Parameter(torch.zeros(1))
    old = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.AdamW([p], lr=1e-3), build_lr_lambda(cfg_with("trainer.max_steps=100", "schedule.warmup_steps=0"))
    )
    for _ in range(50):
        old.optimizer.step()
        old.step()
    new_opt = torch.optim.AdamW([p], lr=1e-3)
    new = torch.optim.lr_scheduler.LambdaLR(
        new_opt, build_lr_lambda(cfg_with("trainer.max_steps=200", "schedule.warmup_steps=0"))
    )
    new.load_state_dict(old.state_dict())
    assert new.last_epoch == 50
    assert new.lr_lambdas[0](50) == pytest.approx((1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.25))) / 1e-3)


def test_soft_target_ce_masks_invalid_rows():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    valid = torch.tensor([True, True, False, True, False, True])
    targets = F.one_hot(labels, 5).float()
    got = soft_target_cross_entropy(logits, targets, valid)
    want = F.cross_entropy(logits[valid], labels[valid])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    logits_nan = logits.clone()
    logits_nan[2] = float("nan")  # garbage in a padding row must not leak
    assert (
        soft_target_cross_entropy(logits_nan, targets, valid).item()
        != soft_target_cross_entropy(logits_nan, targets, torch.ones(6, dtype=torch.bool)).item()
    )
    smooth = targets * 0.9 + 0.1 / 5
    assert soft_target_cross_entropy(logits, smooth, valid).item() == pytest.approx(
        F.cross_entropy(logits[valid], labels[valid], label_smoothing=0.1).item(), rel=1e-6
    )


def test_ema_moves_towards_weights():
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.9)
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.9 * start + 0.1 * model.weight)
    other = ModelEMA(nn.Linear(3, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, ema.module.weight)


def test_ema_update_is_a_few_foreach_kernels_and_a_skipped_step_leaves_it():
    from pretrain.kernel_count import count_kernels
    from pretrain.models import create_model

    model = create_model("sepvit_lite", num_classes=10, img_size=32, window_sizes=[[4], [2, 4], [2] * 6, [1, 1]])
    ema = ModelEMA(model, decay=0.9)
    model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 engine trains
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    start = [e.clone() for e in ema.module.parameters()]
    count = count_kernels(lambda: ema.update(model, skipped=torch.tensor(1.0)))
    assert all(torch.equal(a, b) for a, b in zip(start, ema.module.parameters()))
    assert count.host_reads == [] and count.kernels <= 8, count.by_op  # vs 2 per tensor (170 tensors)
    ema.update(model, skipped=torch.tensor(0.0))
    for a, e, p in zip(start, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * a + 0.1 * p.float())


def test_the_optimizers_are_fused_and_stay_fused_after_a_checkpoint_load():
    model = nn.Linear(4, 3)
    for name in ("adamw", "sgd"):
        opt = build_optimizer(cfg_with(f"optim.name={name}"), param_groups(model, 0.05))
        assert all(g["fused"] for g in opt.param_groups), name
    from pretrain.engine import EngineParts, reapply_optim_config

    cfg = cfg_with("optim.lr=1e-3", "optim.weight_decay=0.05")
    groups = param_groups(model, 0.05)
    for g in groups:
        g["lr"] = 1e-3
    unfused = torch.optim.AdamW(groups, lr=1e-3)  # a checkpoint written before the fused optimizer
    model(torch.randn(2, 4)).sum().backward()
    unfused.step()
    sched = torch.optim.lr_scheduler.LambdaLR(unfused, build_lr_lambda(cfg))
    parts = EngineParts(None, unfused, sched, {}, [(1.0, True), (1.0, False)])
    reapply_optim_config(parts, cfg)
    assert all(g["fused"] and g["foreach"] is None for g in unfused.param_groups)
    unfused.found_inf, unfused.grad_scale = torch.tensor(1.0), torch.tensor(1.0)
    before = model.weight.clone()
    unfused.step()  # the fused kernel, which takes found_inf: skipped
    assert torch.equal(before, model.weight)


def test_a_loaded_optimizer_state_takes_the_layout_of_channels_last_weights():
    from pretrain.engine import EngineParts, reapply_optim_config

    conv = nn.Conv2d(3, 8, 3)
    cfg = cfg_with("optim.lr=1e-3")
    groups = param_groups(conv, 0.05)
    for g in groups:
        g["lr"] = 1e-3
    opt = build_optimizer(cfg, groups)
    conv(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()  # moments in the contiguous layout, as a checkpoint of a CPU run holds them
    moments = {k: v.clone() for k, v in opt.state[conv.weight].items()}
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)  # what CUDA ZeRO-0 runs use
    parts = EngineParts(
        None, opt, torch.optim.lr_scheduler.LambdaLR(opt, build_lr_lambda(cfg)), {}, [(1.0, True), (1.0, False)]
    )
    reapply_optim_config(parts, cfg)
    state = opt.state[conv.weight]
    assert state["exp_avg"].stride() == conv.weight.stride() != moments["exp_avg"].stride()
    assert torch.equal(state["exp_avg"], moments["exp_avg"]) and torch.equal(state["exp_avg_sq"], moments["exp_avg_sq"])


def test_optimizer_state_bytes_counts_adam_moments():
    model = nn.Linear(100, 10)
    opt = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(opt) == 0
    model(torch.randn(2, 100)).sum().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert optimizer_state_bytes(opt) == 2 * 4 * n  # exp_avg + exp_avg_sq in fp32; the scalar step is not state


RUN_CONFIGS = ["digits_sepvit_lite", "digits_setformer_lite", "imagenet_sepvit_tiny", "imagenet_setformer_tiny"]
REQUIRED_OVERRIDES = [
    "run.name=x",
    "run.output_dir=/tmp/x",
    "data.path=/tmp/d",
    "trainer.max_steps=500000",
    "trainer.eval_every_steps=7",
    "checkpoint.every_steps=9",
    "checkpoint.keep_last=3",
    "optim.lr=1e-4",
    "optim.weight_decay=0.01",
    "trainer.seed=3",
]


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_run_configs_resolve_and_take_the_documented_overrides(name):
    cfg = load_config(f"configs/run/{name}.yaml", [*REQUIRED_OVERRIDES, "deepspeed.zero_stage=1"])
    assert (cfg.run.name, cfg.data.path, cfg.trainer.max_steps, cfg.optim.lr, cfg.trainer.seed) == (
        "x", "/tmp/d", 500000, 1e-4, 3
    )  # fmt: skip
    assert cfg.deepspeed.zero_stage == 1
    default = load_config(f"configs/run/{name}.yaml")
    assert default.deepspeed.zero_stage == 2
    if name.startswith("imagenet"):
        want = 1024 if "sepvit" in name else 2048
        assert default.trainer.global_batch_size == want
        assert build_ds_config(default, 8)["train_batch_size"] == want  # 8 GPUs, as in the recipes
        assert default.trainer.precision == "bf16"
        assert (default.augment.mixup_alpha, default.augment.cutmix_alpha) == (0.8, 1.0)
        assert (default.augment.randaug_m, default.augment.randaug_mstd) == (9.0, 0.5)
        assert (default.augment.label_smoothing, default.augment.random_erasing) == (0.1, 0.25)
        assert (default.trainer.ema_decay > 0) == ("setformer" in name)
    else:
        assert build_ds_config(default, 2)["train_batch_size"] == 128
        assert default.augment.hflip == 0.0 and default.augment.mixup_alpha == 0.0


def test_exit_codes_agree():
    import launch.cmd_train as cmd
    import pretrain.trainer as trainer

    assert (cmd.EXIT_OK, cmd.EXIT_FAILED, cmd.EXIT_USAGE, cmd.EXIT_PREEMPTED) == (0, 1, 2, 3)
    assert (trainer.EXIT_OK, trainer.EXIT_FAILED, trainer.EXIT_USAGE, trainer.EXIT_PREEMPTED) == (0, 1, 2, 3)


# ------------------------------------------------------------------------------- distributed environment detection


def test_env_from_torchrun_or_deepspeed_launcher():
    from pretrain.distributed import detect_environment

    env = detect_environment(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n0",
         "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.source) == ("n0", 29500, "env")


def test_env_from_slurm_uses_first_host_and_a_job_derived_port():
    from pretrain.distributed import detect_environment

    env = detect_environment(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
         "SLURM_JOB_NODELIST": "gpu[07-09,12]", "SLURM_TASKS_PER_NODE": "2(x4)"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 2)
    assert env.master_addr == "gpu07" and env.source == "slurm" and env.slurm_job_id == "1234"
    assert env.master_port == 20000 + 1234
    assert detect_environment({**dict(SLURM_PROCID="0", SLURM_NTASKS="1"), "MASTER_PORT": "1111"}).master_port == 1111


def test_env_single_process_and_errors():
    from pretrain.distributed import detect_environment, expand_slurm_nodelist

    assert detect_environment({}).source == "single" and detect_environment({}).world_size == 1
    with pytest.raises(ValueError, match="MASTER_PORT"):
        detect_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside"):
        detect_environment({"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    assert expand_slurm_nodelist("a[1-3],b,c[09-10]x") == ["a1", "a2", "a3", "b", "c09x", "c10x"]
