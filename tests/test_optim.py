"""Parameter groups, trainable blocks, schedules (METHOD.md §4) and the EMA update."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from neco.engine.optim import build_schedules, param_groups, select_trainable_blocks
from neco.errors import ConfigError
from neco.models.ema import ema_update


def _optim_cfg(**kw):
    base = dict(lr_backbone=1e-5, lr_heads=1e-4, final_lr=0.0, weight_decay=0.04, weight_decay_end=0.5,
                momentum_teacher=0.9995, momentum_teacher_end=1.0, exclude_norm_bias=True, decay_tokens=True,
                betas=[0.9, 0.999], eps=1e-8, zero_loss_step="advance")
    base.update(kw)
    return SimpleNamespace(**base)


class TinyViT(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.reg_token = nn.Parameter(torch.zeros(1, 2, 4))
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(depth))
        self.norm = nn.LayerNorm(4)


def _names(module, params):
    ids = {id(p) for p in params}
    return sorted(n for n, p in module.named_parameters() if id(p) in ids)


def test_param_groups_follow_the_reference():
    backbone, head = TinyViT(), nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    groups = param_groups(backbone, head, _optim_cfg())
    assert [g["name"] for g in groups] == ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    decayed = _names(backbone, groups[0]["params"])
    # The reference decays every >= 2-D tensor, tokens and position embedding included (METHOD.md §4.1, §10.24).
    assert {"cls_token", "pos_embed", "reg_token", "patch_embed.weight", "blocks.0.1.weight"} <= set(decayed)
    assert "blocks.0.0.weight" not in decayed and "patch_embed.bias" not in decayed
    assert [g["lr"] for g in groups] == [1e-5, 1e-5, 1e-4, 1e-4]
    assert [g["decay"] for g in groups] == [True, False, True, False]
    fixed = param_groups(backbone, head, _optim_cfg(decay_tokens=False))
    assert not {"cls_token", "pos_embed", "reg_token"} & set(_names(backbone, fixed[0]["params"]))
    assert {"cls_token", "pos_embed", "reg_token"} <= set(_names(backbone, fixed[1]["params"]))


@pytest.mark.parametrize("selection,trainable", [
    (None, {0, 1, 2}), (-1, {2}), (1, {1, 2}), ([0, 2], {0, 2}),
])
def test_trainable_blocks(selection, trainable):
    vit = TinyViT()
    select_trainable_blocks(vit, selection)
    for name, p in vit.named_parameters():
        if name.startswith("blocks."):
            assert p.requires_grad == (int(name.split(".")[1]) in trainable), name
        else:  # patch embed, tokens, pos-embed and final norm are frozen as soon as blocks are selected
            assert p.requires_grad == (selection is None), name


def test_trainable_blocks_unknown_block_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.trainable_blocks"):
        select_trainable_blocks(TinyViT(), [7])


def test_schedules_match_the_spec_formulas():
    T = 37
    s = build_schedules(_optim_cfg(), T)
    t = np.arange(T)
    np.testing.assert_allclose([s.lr(1e-5, i) for i in t], 0.5 * 1e-5 * (1 + np.cos(np.pi * t / T)))
    np.testing.assert_allclose(s.weight_decay, 0.5 + 0.5 * (0.04 - 0.5) * (1 + np.cos(np.pi * t / T)))
    np.testing.assert_allclose(s.momentum, 1 + 0.5 * (0.9995 - 1) * (1 + np.cos(np.pi * t / T)))
    assert s.lr(1e-4, 0) == pytest.approx(1e-4) and s.weight_decay[0] == pytest.approx(0.04)
    assert s.momentum[0] == pytest.approx(0.9995) and len(s.momentum) == T


def test_schedules_write_into_groups():
    backbone, head = TinyViT(), nn.Linear(4, 2)
    opt = torch.optim.AdamW(param_groups(backbone, head, _optim_cfg()))
    s = build_schedules(_optim_cfg(), 10)
    s.apply(opt, 5)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    wds = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert lrs["backbone_decay"] == pytest.approx(0.5 * 1e-5 * (1 + math.cos(math.pi / 2)))
    assert wds["backbone_decay"] == pytest.approx(s.weight_decay[5]) and wds["backbone_no_decay"] == 0.0
    assert wds["head_decay"] == pytest.approx(s.weight_decay[5])


def test_empty_run_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size"):
        build_schedules(_optim_cfg(), 0)


def test_ema_momentum_zero_copies_and_one_freezes():
    student, teacher = nn.Linear(3, 3), nn.Linear(3, 3)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    teacher2 = nn.Linear(3, 3)
    expected = [0.9 * t + 0.1 * s for t, s in zip(teacher2.parameters(), student.parameters())]
    ema_update(teacher2, student, 0.9)
    assert all(torch.allclose(a, b) for a, b in zip(expected, teacher2.parameters()))
