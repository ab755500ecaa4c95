"""The reference's register-model parameters (CLS position) and zero-loss steps, against float64 re-derivations.

Each default follows the reference; each option test checks that the option changes what it claims.
"""

import json

import pytest
import timm
import torch
from helpers import randomize_
from test_train import tiny_cfg
from torch import nn

import neco.engine.trainer as trainer_module
from neco.engine.optim import build_optimizer, build_schedules, param_groups
from neco.engine.trainer import Trainer
from neco.errors import ConfigError
from neco.export import export_backbone
from neco.models.backbone import BACKBONES, Backbone, BackboneSpec, create_vit
from neco.train import train

DT = torch.float64
REG = BackboneSpec("vit_small_patch14_reg4_dinov2", 8, 16, "dinov2", num_register_tokens=4, img_size=32,
                   timm_kwargs={"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2, "init_values": 1.0})
LR, WD, EPS = 1e-3, 0.04, 1e-8


def _optim_cfg():
    from types import SimpleNamespace

    return SimpleNamespace(lr_backbone=LR, lr_heads=LR, final_lr=0.0, weight_decay=WD, weight_decay_end=0.5,
                           momentum_teacher=0.9995, momentum_teacher_end=1.0, exclude_norm_bias=True,
                           decay_tokens=True, betas=[0.9, 0.999], eps=EPS, zero_loss_step="advance")


def _reg_backbones():
    """The same register network with DINOv2's parameters (separate) and with timm's (folded)."""
    separate = randomize_(Backbone(create_vit(REG), REG, "tiny_reg"), seed=4).double()
    folded = Backbone(create_vit(REG), REG, "tiny_reg", cls_position="folded").double()
    folded.load_state_dict(separate.timm_state_dict())
    return separate, folded


def _one_step(backbone, x, target):
    """One AdamW step (the reference's groups and wd(0)) on a fixed loss; returns the parameters before."""
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    cfg = _optim_cfg()
    optimizer = build_optimizer(param_groups(backbone, nn.Module(), cfg), cfg, torch.device("cpu"))
    build_schedules(cfg, 10).apply(optimizer, 0)
    ((backbone(x) - target) ** 2).sum().backward()
    optimizer.step()
    return before


def test_register_models_keep_dinov2s_cls_parameters_and_adamw_moves_both():
    separate, folded = _reg_backbones()
    assert separate.pos_embed.shape == (1, 1 + 16, 16) and folded.pos_embed.shape == (1, 16, 16)
    g = torch.Generator().manual_seed(0)
    # At the stored grid: other sizes interpolate the position embeddings in float32, as DINOv2 does.
    x, target = torch.randn(3, 3, 32, 32, generator=g, dtype=DT), torch.randn(3, 4, 4, 16, generator=g, dtype=DT)
    with torch.no_grad():  # the same network: the parametrisation changes only what AdamW sees
        torch.testing.assert_close(separate(x), folded(x), rtol=1e-12, atol=1e-12)
    cls_in = {}
    for name, model in (("separate", separate), ("folded", folded)):
        before = _one_step(model, x, target)
        cls_in[name] = (before["cls_token"] + (before["pos_embed"][:, :1] if name == "separate" else 0),
                        model.cls_token.detach() + (model.pos_embed[:, :1].detach() if name == "separate" else 0))
        # Every parameter: AdamW's first step, re-derived (m_hat = g, v_hat = g^2), decay on >= 2-D non-bias.
        for n, p in model.named_parameters():
            grad, old = p.grad, before[n]
            wd = WD if p.ndim >= 2 and not n.endswith(".bias") else 0.0
            expected = old * (1 - LR * wd) - LR * grad / (grad.abs() + EPS)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15, msg=f"{name}: {n}")
        # Both gradients of the separate parametrisation are the CLS input's gradient.
        if name == "separate":
            torch.testing.assert_close(model.pos_embed.grad[:, :1], model.cls_token.grad, rtol=1e-12, atol=0)
    # The CLS input (cls_token + its position embedding) moves by two Adam steps with DINOv2's parameters and by
    # one with timm's; the decay acts on the same sum either way.
    for name, steps in (("separate", 2), ("folded", 1)):
        old, new = cls_in[name]
        move = (new - old * (1 - LR * WD)).abs()
        torch.testing.assert_close(move, torch.full_like(move, steps * LR), rtol=1e-6, atol=0)


def test_cls_position_conversions_keep_the_network(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKBONES, "tiny_reg", REG)
    separate, folded = _reg_backbones()
    separate, folded = separate.float().eval(), folded.float().eval()
    x = torch.randn(2, 3, 32, 32)
    # A checkpoint of either parametrisation loads into the other.
    path = tmp_path / "separate.pth"
    torch.save(separate.state_dict(), path)
    again = Backbone(create_vit(REG), REG, "tiny_reg", cls_position="folded").eval()
    again.load_weights(path)
    torch.save(folded.state_dict(), tmp_path / "folded.pth")
    back = Backbone(create_vit(REG), REG, "tiny_reg").eval()
    back.load_weights(tmp_path / "folded.pth")
    # The timm export loads strictly into plain timm.
    out = export_backbone(str(path), "timm", tmp_path / "out", backbone="tiny_reg")
    plain = timm.create_model(REG.timm_name, pretrained=False, num_classes=0, img_size=32, **REG.timm_kwargs)
    plain.load_state_dict(torch.load(out.path))
    with torch.no_grad():
        ours = separate(x)
        for other in (again(x), back(x), plain.eval().forward_features(x)[:, 5:].reshape(2, 4, 4, 16)):
            torch.testing.assert_close(other, ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="backbone.cls_position"):
        Backbone(create_vit(REG), REG, "tiny_reg", cls_position="merged")


# ------------------------------------------------------------------------------------------------ zero-loss steps


def _cosine(start, end, t, total):
    return end + 0.5 * (start - end) * (1 + torch.cos(torch.tensor(torch.pi * t / total, dtype=DT))).item()


@pytest.mark.parametrize("mode", ["advance", "hold"])
def test_zero_loss_step_is_skipped_and_the_schedules_follow_the_mode(tmp_path, monkeypatch, mode):
    cfg = tiny_cfg(tmp_path, "max_steps=5", f"optim.zero_loss_step={mode}")
    total = 4 * cfg.optim.epochs  # 8 images in batches of 2
    losses, updates, momenta = [], [], []
    compute_loss, optimizer_step, ema_update = Trainer.compute_loss, Trainer._optimizer_step, trainer_module.ema_update

    def zero_second_batch(self, crops, boxes):  # the second batch: every pair masked out
        loss = compute_loss(self, crops, boxes)
        losses.append(loss)
        return loss * 0 if len(losses) == 2 else loss

    def record_step(self):
        updates.append({g["name"]: g["lr"] for g in self.optimizer.param_groups})
        return optimizer_step(self)

    monkeypatch.setattr(Trainer, "compute_loss", zero_second_batch)
    monkeypatch.setattr(Trainer, "_optimizer_step", record_step)
    monkeypatch.setattr(trainer_module, "ema_update", lambda t, s, m: (momenta.append(m), ema_update(t, s, m)))
    result = train(cfg, tmp_path / "run")
    # advance (reference): the zero batch uses schedule index 1 and skips it; hold: it is not counted at all.
    used = [0, 2, 3, 4] if mode == "advance" else [0, 1, 2, 3, 4]
    assert result["step"] == 5 and len(losses) == (5 if mode == "advance" else 6)
    assert len(updates) == len(momenta) == len(used)  # no update and no EMA for the zero batch
    for got, t in zip(updates, used):
        assert got["backbone_decay"] == pytest.approx(_cosine(cfg.optim.lr_backbone, 0.0, t, total), rel=1e-12)
        assert got["head_decay"] == pytest.approx(_cosine(cfg.optim.lr_heads, 0.0, t, total), rel=1e-12)
    expected_m = [_cosine(cfg.optim.momentum_teacher, 1.0, t, total) for t in used]
    assert momenta == pytest.approx(expected_m, rel=1e-12)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["reference_options"]
    assert info["optim.zero_loss_step"] == mode
    assert {k: info[k] for k in ("backbone.drop_path_mode", "backbone.cls_position", "loss.mask_blur_padding",
                                 "loss.fg_cell_rule")} == {"backbone.drop_path_mode": "per_sample",  # vit_tiny's preset
                                                           "backbone.cls_position": "separate",
                                                           "loss.mask_blur_padding": "reflect",
                                                           "loss.fg_cell_rule": "exact"}


def test_unknown_zero_loss_step_names_the_key():
    cfg = _optim_cfg()
    cfg.zero_loss_step = "repeat"
    with pytest.raises(ConfigError, match="optim.zero_loss_step"):
        build_schedules(cfg, 10)
