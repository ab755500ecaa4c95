"""The NeCo objective against a float64 re-derivation straight from METHOD.md §3.3-3.7, and its invariants."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffsort import DiffSortNet
from timm.models.vision_transformer import Block
from torchvision.ops import roi_align

from neco.engine.optim import build_optimizer, build_schedules, param_groups
from neco.engine.setup import _disable_drop_path
from neco.engine.trainer import Trainer, TrainState
from neco.loss import NeCoLoss, pair_loss
from neco.loss.pair import soft_permutation
from neco.models.backbone import Backbone, BackboneSpec, create_vit
from neco.models.encoder import DenseEncoder
from neco.models.head import ProjectionHead
from neco.models.stochastic_depth import SubsetDropBlock

DT = torch.float64  # the re-derivation is compared tightly, so everything runs in float64


def _loss_cfg(**kw):
    base = dict(student_steepness=100.0, teacher_steepness=100.0, network="bitonic", distribution="cauchy",
                art_lambda=0.25, similarity="cosine", references="batch", queue_length=8192, mask="all",
                roi_size=7, use_teacher=True, head=SimpleNamespace(out_dim=8), reference_source="teacher",
                queue_counter="shared", teacher_head_init="independent", box_scale="patch",
                sorter="sparse", mask_blur_padding="reflect", fg_cell_rule="exact")
    base.update(kw)
    return SimpleNamespace(**base)


def _unit_maps(batch, dim, side, generator):
    return F.normalize(torch.randn(batch, dim, side, side, generator=generator, dtype=DT), dim=1)


def _random_boxes(batch, sizes, num_global, generator):
    """Pairwise boxes of random overlapping crops, computed from absolute boxes as in METHOD.md §1.4."""
    n = len(sizes)
    gc = torch.zeros(batch, num_global, n, 4, dtype=DT)
    all_ = torch.zeros(batch, n, num_global, 4, dtype=DT)
    for b in range(batch):
        centre = 50 + 20 * torch.rand(2, generator=generator, dtype=DT)
        boxes = []
        for _ in range(n):
            half = 15 + 25 * torch.rand(2, generator=generator, dtype=DT)
            boxes.append(torch.cat([centre - half, centre + half]))  # all crops contain the centre
        for g in range(num_global):
            for j in range(n):
                lo = torch.maximum(boxes[g][:2], boxes[j][:2])
                inter = torch.cat([lo, torch.minimum(boxes[g][2:], boxes[j][2:])])
                for dst, frame, size in ((gc[b, g, j], boxes[g], sizes[g]), (all_[b, j, g], boxes[j], sizes[j])):
                    w, h = frame[2] - frame[0], frame[3] - frame[1]
                    dst[:] = torch.stack([size * (inter[0] - frame[0]) / w, size * (inter[1] - frame[1]) / h,
                                          size * (inter[2] - frame[0]) / w, size * (inter[3] - frame[1]) / h])
    return {"gc": gc, "all": all_}


def _reference_step_loss(student_maps, teacher_maps, boxes, patch, beta_s, beta_t, k=7):
    """METHOD.md §3.3 written out directly: one ROI per image and pair, diffsort as the sorter, float64."""
    num_crops, batch = len(student_maps), student_maps[0].shape[0]
    sorter_s = DiffSortNet("bitonic", k * k, steepness=beta_s)
    sorter_t = DiffSortNet("bitonic", k * k, steepness=beta_t)

    def rois(box):  # (B, 4) pixels -> (B, 5) patch units with the image index
        return torch.cat([torch.arange(batch, dtype=box.dtype)[:, None], box / patch], dim=1)

    def perm(aligned, refs, sorter):
        q = F.normalize(aligned.flatten(2).transpose(1, 2), dim=-1)
        r = F.normalize(refs.flatten(2).transpose(1, 2), dim=-1)
        return sorter((q @ r.transpose(1, 2)).reshape(-1, k * k))[1]

    total = 0.0
    for t in range(len(teacher_maps)):
        losses = 0.0
        for v in range(num_crops):
            if v == t:
                continue
            a_s = roi_align(student_maps[v], rois(boxes["all"][:, v, t]), k, 1.0, -1, True)
            a_t = roi_align(teacher_maps[t], rois(boxes["gc"][:, t, v]), k, 1.0, -1, True)
            pool = a_t.permute(0, 2, 3, 1).reshape(batch * k * k, -1)  # (image, y, x) order
            refs = pool[torch.randperm(batch * k * k)].view(batch, k, k, -1).permute(0, 3, 1, 2)
            p, q = perm(a_s, refs, sorter_s), perm(a_t, refs, sorter_t)
            losses = losses - (q * torch.log(p)).sum() / (batch * k * k * k * k)
        total = total + losses / (num_crops - 1)
    return total / len(teacher_maps)


@pytest.mark.parametrize("beta_s,beta_t", [(100.0, 100.0), (10.0, 1000.0)])
def test_step_loss_equals_spec_rederivation(beta_s, beta_t):
    g = torch.Generator().manual_seed(0)
    patch, sizes, batch, dim = 14, [56, 56, 28, 28, 28, 28], 3, 8
    student = [_unit_maps(batch, dim, s // patch, g).requires_grad_() for s in sizes]
    teacher = [_unit_maps(batch, dim, s // patch, g) for s in sizes[:2]]
    boxes = _random_boxes(batch, sizes, 2, g)
    objective = NeCoLoss(_loss_cfg(student_steepness=beta_s, teacher_steepness=beta_t), patch, sizes, 2, batch)
    torch.manual_seed(1)
    ours = objective(student, teacher, boxes)
    torch.manual_seed(1)  # the same reference permutations, drawn in the same order
    expected = _reference_step_loss(student, teacher, boxes, patch, beta_s, beta_t)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(ours, student)
    expected_grads = torch.autograd.grad(expected, student)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


SMALL_VIT = {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}
STEP_BACKBONES = {  # depth 2 at drop_path_rate 0.1: block rates 0 and float32(0.1)
    "v1": BackboneSpec("vit_small_patch16_224", 8, 16, "dino", img_size=32, timm_kwargs=SMALL_VIT),
    "v2": BackboneSpec("vit_small_patch14_dinov2", 8, 16, "dinov2", img_size=32,
                       timm_kwargs={**SMALL_VIT, "init_values": 1.0}),
    "v2_reg": BackboneSpec("vit_small_patch14_reg4_dinov2", 8, 16, "dinov2", num_register_tokens=4, img_size=32,
                           timm_kwargs={**SMALL_VIT, "init_values": 1.0}),
}


@pytest.mark.parametrize("version", list(STEP_BACKBONES))
def test_full_step_updates_every_parameter_and_the_teacher_as_specified(version):
    """One training step with stochastic depth on: loss and gradients against the re-derivation above, then every
    student parameter against AdamW's first step (METHOD.md §4.1 groups, wd(0), lr(0)) and every teacher parameter
    against the EMA with the pre-update student (METHOD.md §4.4, §4.8)."""
    from helpers import randomize_

    spec = STEP_BACKBONES[version]
    torch.manual_seed(0)
    backbone = randomize_(Backbone(create_vit(spec, drop_path_rate=0.1), spec, version), seed=1)
    student = DenseEncoder(backbone, randomize_(ProjectionHead(16, 32, 8, 3), seed=2)).to(DT).train()
    teacher = copy.deepcopy(student).eval()
    _disable_drop_path(teacher)
    randomize_(teacher.head, seed=3)  # the reference's independently initialised teacher head
    teacher.requires_grad_(False)
    last = backbone.blocks[-1]
    assert type(last) is (Block if version == "v1" else SubsetDropBlock) and last.drop_path1.drop_prob > 0.1
    if version == "v2_reg":  # DINOv2's parameters: a CLS entry in pos_embed next to cls_token
        assert backbone.pos_embed.shape[1] == 1 + 16
    g = torch.Generator().manual_seed(4)
    batch, sizes = 3, [32, 32, 16, 16, 16, 16]
    crops = [torch.randn(batch, 3, s, s, generator=g, dtype=DT) for s in sizes]
    boxes = _random_boxes(batch, sizes, 2, g)
    student_maps = student(crops)
    with torch.no_grad():
        teacher_maps = teacher(crops[:2])
    objective = NeCoLoss(_loss_cfg(roi_size=4), 8, sizes, 2, batch)  # 4x4 cells keep the dense sorter quick
    torch.manual_seed(5)
    ours = objective(student_maps, teacher_maps, boxes)
    torch.manual_seed(5)
    expected = _reference_step_loss(student_maps, teacher_maps, boxes, 8, 100.0, 100.0, k=4)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    names, params = zip(*student.named_parameters())
    grads = torch.autograd.grad(ours, params, retain_graph=True)
    for name, a, b in zip(names, grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=name)
    assert all(bool(gr.abs().sum() > 0) for gr in grads)  # stochastic depth left every parameter in the graph

    cfg = SimpleNamespace(lr_backbone=1e-4, lr_heads=1e-3, final_lr=0.0, weight_decay=0.04, weight_decay_end=0.5,
                          momentum_teacher=0.99, momentum_teacher_end=1.0, exclude_norm_bias=True, decay_tokens=True,
                          betas=[0.9, 0.999], eps=1e-8, zero_loss_step="advance", ema_timing="before_step",
                          grad_clip=None)
    optimizer = build_optimizer(param_groups(backbone, student.head, cfg), cfg, torch.device("cpu"))
    schedules = build_schedules(cfg, 10)
    schedules.apply(optimizer, 0)
    for p, gr in zip(params, grads):
        p.grad = gr
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    runner = SimpleNamespace(state=TrainState(), schedules=schedules, settings=cfg,
                             teacher=teacher, student=student, optimizer=optimizer, trainable=list(params),
                             scaler=torch.amp.GradScaler("cpu", enabled=False))
    Trainer._optimizer_step(runner)
    assert runner.state.step == 1
    for (name, p), gr in zip(student.named_parameters(), grads):
        lr = cfg.lr_heads if name.startswith("head.") else cfg.lr_backbone
        wd = cfg.weight_decay if p.ndim >= 2 and not name.endswith(".bias") else 0.0
        old = student_before[name]
        # AdamW's first step: m_hat = g, v_hat = g^2, decoupled decay.
        torch.testing.assert_close(p.detach(), old * (1 - lr * wd) - lr * gr / (gr.abs() + cfg.eps),
                                   rtol=1e-12, atol=1e-15, msg=name)
    m = cfg.momentum_teacher  # momentum(0)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, m * teacher_before[name] + (1 - m) * student_before[name],
                                   rtol=1e-12, atol=1e-15, msg=name)


def test_dense_and_sparse_sorters_give_the_same_step_loss():
    g = torch.Generator().manual_seed(2)
    patch, sizes, batch = 14, [42, 42, 28, 28], 2
    student = [_unit_maps(batch, 8, s // patch, g).requires_grad_() for s in sizes]
    teacher = [_unit_maps(batch, 8, s // patch, g) for s in sizes[:2]]
    boxes = _random_boxes(batch, sizes, 2, g)
    losses, grads = [], []
    for sorter in ("sparse", "dense"):
        torch.manual_seed(0)
        loss = NeCoLoss(_loss_cfg(sorter=sorter), patch, sizes, 2, batch)(student, teacher, boxes)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, student))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_identical_inputs_give_the_entropy_minimum():
    g = torch.Generator().manual_seed(3)
    a, refs = _unit_maps(2, 6, 7, g), _unit_maps(2, 6, 7, g)
    loss = pair_loss(a, a, refs, 100.0, 100.0)
    q = soft_permutation(a, refs, 100.0)
    entropy = -(q * q.log()).sum() / (2 * 49 * 49)
    torch.testing.assert_close(loss, entropy)
    for _ in range(5):  # any other student input costs more (Gibbs' inequality)
        other = F.normalize(a + 0.3 * torch.randn(a.shape, generator=g, dtype=DT), dim=1)
        assert pair_loss(other, a, refs, 100.0, 100.0) > loss


def test_only_the_student_gets_gradients():
    g = torch.Generator().manual_seed(4)
    s, t, r = (_unit_maps(2, 6, 7, g).requires_grad_() for _ in range(3))
    pair_loss(s, t, r.detach(), 100.0, 100.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_loss_in_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(5)
    s, t, r = (_unit_maps(2, 6, 7, g).float().bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pair_loss(s, t, r, 100.0, 100.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_log_clamp_keeps_underflowing_distributions_finite():
    g = torch.Generator().manual_seed(6)
    s, t, r = (_unit_maps(2, 6, 7, g) for _ in range(3))
    loss = pair_loss(s * 50, t * 50, r, 100.0, 100.0, similarity="euclidean", distribution="logistic")
    assert torch.isfinite(loss)


def test_queue_shared_counter_reproduces_the_reference_bookkeeping():
    g = torch.Generator().manual_seed(7)
    batch, patch, sizes = 2, 14, [56, 56, 28]
    objective = NeCoLoss(_loss_cfg(references="queue", queue_length=400), patch, sizes, 2, batch)
    student = [_unit_maps(batch, 8, s // patch, g) for s in sizes]
    teacher = [_unit_maps(batch, 8, 4, g) for _ in range(2)]
    boxes = _random_boxes(batch, sizes, 2, g)
    objective(student, teacher, boxes)
    # 10 rows per image and teacher crop; the shared counter advanced once per crop (METHOD.md §3.4, §10.6).
    assert objective.queue_entries.tolist() == [40, 40]
    assert (objective.queue[0, :20].norm(dim=1) > 0.99).all() and (objective.queue[0, 20:] == 0).all()
    fixed = NeCoLoss(_loss_cfg(references="queue", queue_length=400, queue_counter="per_queue"), patch, sizes, 2,
                     batch)
    fixed(student, teacher, boxes)
    assert fixed.queue_entries.tolist() == [20, 20]
    assert set(objective.state_dict()) == {"queue", "queue_entries"}  # checkpointed with the run


def test_queue_too_short_is_a_config_error():
    with pytest.raises(ValueError, match="loss.queue_length"):
        NeCoLoss(_loss_cfg(references="queue", queue_length=100), 14, [56, 56], 2, 4)


def test_unknown_option_names_the_key():
    with pytest.raises(ValueError, match="loss.network"):
        NeCoLoss(_loss_cfg(network="merge"), 14, [56, 56], 2, 4)


def test_foreground_mask_restricts_cells_and_references():
    g = torch.Generator().manual_seed(8)
    batch, patch, sizes = 2, 14, [56, 56, 28]
    student = [_unit_maps(batch, 8, s // patch, g) for s in sizes]
    teacher = [_unit_maps(batch, 8, 4, g) for _ in range(2)]
    boxes = _random_boxes(batch, sizes, 2, g)
    full = torch.ones(2, batch, 1, 4, 4, dtype=DT)
    # tolerant: every fully covered cell counts (the reference's exact rule also drops cells whose aligned value
    # rounds below 1, see test_training_fidelity.py)
    fg_obj = NeCoLoss(_loss_cfg(mask="fg", fg_cell_rule="tolerant"), patch, sizes, 2, batch)
    all_obj = NeCoLoss(_loss_cfg(mask="all"), patch, sizes, 2, batch)
    torch.manual_seed(0)
    with_full_mask = fg_obj(student, teacher, boxes, full)
    torch.manual_seed(0)
    torch.testing.assert_close(with_full_mask, all_obj(student, teacher, boxes))  # all-foreground == no mask
    bg_obj = NeCoLoss(_loss_cfg(mask="bg"), patch, sizes, 2, batch)
    assert bg_obj(student, teacher, boxes, full) == 0  # no background anywhere: every pair is skipped
