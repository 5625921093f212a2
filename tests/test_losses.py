"""Segmentation losses against reference implementations and hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segtrain.losses import (
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    OhemCrossEntropyLoss,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
IGNORE = 255

ALL_LOSSES = {
    "ce": lambda: CrossEntropyLoss(class_weights=[1.0, 2.0, 0.5, 1.5], label_smoothing=0.1),
    "ohem": lambda: OhemCrossEntropyLoss(thresh=0.7, min_kept=20),
    "focal": lambda: FocalLoss(gamma=2.0, alpha=[0.25, 0.5, 0.75, 1.0]),
    "dice": lambda: DiceLoss(),
    "lovasz": lambda: LovaszSoftmaxLoss(),
    "lovasz_per_image": lambda: LovaszSoftmaxLoss(per_image=True, classes="all"),
    "combined": lambda: CombinedLoss({"ce": CrossEntropyLoss(), "dice": DiceLoss()}),
}


def random_batch(seed: int = 0, n: int = 2, c: int = 4, h: int = 6, w: int = 5, scale: float = 2.0):
    """Random logits (N, C, H, W) and labels with about a fifth of the pixels ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * scale
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    return logits, target


def logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax over dim 1 is exactly `probs` (rows summing to 1)."""
    return probs.log()


# ------------------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize(
    ("weights", "smoothing"),
    [(None, 0.0), ([1.0, 2.0, 0.5, 3.0], 0.0), ([1.0, 2.0, 0.5, 3.0], 0.2)],
)
def test_cross_entropy_equals_torch_with_weights_smoothing_and_ignore(weights, smoothing):
    logits, target = random_batch()
    expected = F.cross_entropy(
        logits, target, weight=None if weights is None else torch.tensor(weights),
        ignore_index=IGNORE, label_smoothing=smoothing,
    )
    loss = CrossEntropyLoss(class_weights=weights, label_smoothing=smoothing)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cross_entropy_rejects_class_weights_of_the_wrong_length():
    logits, target = random_batch()
    with pytest.raises(ValueError, match="3 entries but logits have 4 classes"):
        CrossEntropyLoss(class_weights=[1.0, 1.0, 1.0])(logits, target)


def test_loss_rejects_target_whose_shape_does_not_match_logits():
    logits, target = random_batch()
    with pytest.raises(ValueError, match="target must be int64 of shape"):
        CrossEntropyLoss()(logits, target[:, :-1])


# ---------------------------------------------------------------------------------------- OHEM
def ohem_case():
    """One image, two classes, every label 0: true-class probabilities listed, one ignored."""
    p_true = torch.tensor([0.1, 0.5, 0.65, 0.75, 0.9, 0.95, 0.05])
    probs = torch.stack([p_true, 1 - p_true]).view(1, 2, 1, 7)
    target = torch.zeros(1, 1, 7, dtype=torch.int64)
    target[0, 0, 6] = IGNORE
    return logits_from_probs(probs), target, p_true


@pytest.mark.parametrize(
    ("min_kept", "expected_kept"),
    [(0, [0, 1, 2]), (2, [0, 1, 2]), (4, [0, 1, 2, 3]), (100, [0, 1, 2, 3, 4, 5])],
)
def test_ohem_keeps_pixels_below_thresh_but_at_least_min_kept_hardest(min_kept, expected_kept):
    logits, target, p_true = ohem_case()
    loss_fn = OhemCrossEntropyLoss(thresh=0.7, min_kept=min_kept)
    kept = loss_fn.kept_mask(logits, target).flatten().nonzero().flatten().tolist()
    assert kept == expected_kept
    expected = -p_true[expected_kept].log().mean()
    assert loss_fn(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ohem_with_thresh_one_equals_cross_entropy():
    logits, target = random_batch(seed=3)
    weights = [1.0, 2.0, 0.5, 3.0]
    ohem = OhemCrossEntropyLoss(thresh=1.0, min_kept=0, class_weights=weights)(logits, target)
    ce = CrossEntropyLoss(class_weights=weights)(logits, target)
    assert ohem.item() == pytest.approx(ce.item(), rel=1e-6)


# --------------------------------------------------------------------------------------- focal
def test_focal_with_gamma_zero_equals_cross_entropy():
    logits, target = random_batch(seed=1)
    expected = F.cross_entropy(logits, target, ignore_index=IGNORE)
    assert FocalLoss(gamma=0.0)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_hand_computed_with_per_class_and_scalar_alpha():
    # pixel 0: class 0 with p_t = 0.25; pixel 1: class 1 with p_t = 0.6
    probs = torch.tensor([[0.25, 0.4], [0.75, 0.6]]).view(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    logits = logits_from_probs(probs)
    terms = [0.75**2 * -math.log(0.25), 0.4**2 * -math.log(0.6)]
    assert FocalLoss(gamma=2.0)(logits, target).item() == pytest.approx(sum(terms) / 2, rel=1e-5)
    per_class = FocalLoss(gamma=2.0, alpha=[0.2, 0.8])(logits, target).item()
    assert per_class == pytest.approx((0.2 * terms[0] + 0.8 * terms[1]) / 2, rel=1e-5)
    scalar = FocalLoss(gamma=2.0, alpha=0.25)(logits, target).item()
    assert scalar == pytest.approx(0.25 * sum(terms) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------- dice
def dice_case():
    """2x2 image, two classes: p(class 0) = 0.8, 0.6, 0.3 on labels 0, 0, 1; fourth ignored."""
    p0 = torch.tensor([0.8, 0.6, 0.3, 0.5])
    probs = torch.stack([p0, 1 - p0]).view(1, 2, 2, 2)
    target = torch.tensor([[[0, 0], [1, IGNORE]]])
    return logits_from_probs(probs), target


def test_dice_hand_computed_on_a_2x2_case():
    logits, target = dice_case()
    # class 0: 2*(0.8+0.6)+1 over (0.64+0.36+0.09)+2+1; class 1: 2*0.7+1 over (.04+.16+.49)+1+1
    expected_sq = ((1 - 3.8 / 4.09) + (1 - 2.4 / 2.69)) / 2
    assert DiceLoss(exponent=2)(logits, target).item() == pytest.approx(expected_sq, rel=1e-5)
    expected_lin = ((1 - 3.8 / 4.7) + (1 - 2.4 / 3.3)) / 2
    assert DiceLoss(exponent=1)(logits, target).item() == pytest.approx(expected_lin, rel=1e-5)


def test_dice_of_a_perfect_prediction_is_about_zero():
    _, target = random_batch(seed=2)
    logits = 30.0 * F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    assert DiceLoss()(logits, target).item() < 1e-6


# -------------------------------------------------------------------------------------- lovasz
def reference_lovasz(probs: torch.Tensor, labels: torch.Tensor, classes="present") -> float:
    """Berman et al.'s algorithm written directly: drop ignored pixels, then per class."""
    keep = labels != IGNORE
    probs, labels = probs[:, keep], labels[keep]
    losses = []
    for c in range(probs.shape[0]) if classes in ("present", "all") else classes:
        fg = (labels == c).float()
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs[c]).abs()
        errors, order = errors.sort(descending=True)
        fg = fg[order]
        total = fg.sum()
        jaccard = 1 - (total - fg.cumsum(0)) / (total + (1 - fg).cumsum(0))
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(float(errors @ grad))
    return sum(losses) / len(losses)


def test_lovasz_hand_computed_small_case():
    # labels 0, 0, 1 with p(class 0) = 0.8, 0.4, 0.3: class 0 loses 0.6*1/2 + 0.3*1/6 + 0.2*1/3,
    # class 1 loses 0.6*1/2 + 0.3*1/2 + 0.2*0; the mean over the two present classes is 0.4333...
    p0 = torch.tensor([0.8, 0.4, 0.3])
    logits = logits_from_probs(torch.stack([p0, 1 - p0]).view(1, 2, 1, 3))
    target = torch.tensor([[[0, 0, 1]]])
    assert LovaszSoftmaxLoss()(logits, target).item() == pytest.approx(0.4333333, rel=1e-5)


@pytest.mark.parametrize("classes", ["present", "all", [1, 3]])
def test_lovasz_matches_the_direct_algorithm(classes):
    logits, target = random_batch(seed=4, n=3)
    probs = logits.softmax(dim=1)
    flat = reference_lovasz(probs.permute(1, 0, 2, 3).flatten(1), target.flatten(), classes)
    assert LovaszSoftmaxLoss(classes=classes)(logits, target).item() == pytest.approx(flat, 1e-5)
    per_image = [reference_lovasz(probs[i].flatten(1), target[i].flatten(), classes)
                 for i in range(3)]
    loss = LovaszSoftmaxLoss(per_image=True, classes=classes)(logits, target).item()
    assert loss == pytest.approx(sum(per_image) / 3, rel=1e-5)


def test_lovasz_per_image_averages_only_images_with_valid_pixels():
    logits, target = random_batch(seed=12, n=3)
    target[1] = IGNORE
    loss = LovaszSoftmaxLoss(per_image=True)(logits, target).item()
    expected = [LovaszSoftmaxLoss()(logits[i : i + 1], target[i : i + 1]).item() for i in (0, 2)]
    assert loss == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_lovasz_of_a_perfect_prediction_is_zero():
    _, target = random_batch(seed=5)
    logits = 40.0 * F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    assert LovaszSoftmaxLoss()(logits, target).item() < 1e-6


# ------------------------------------------------------------------------------------ combined
def test_combined_loss_is_the_weighted_sum_and_records_each_part():
    logits, target = random_batch(seed=6)
    ce, dice = CrossEntropyLoss(), DiceLoss()
    loss_fn = CombinedLoss({"ce": ce, "dice": dice}, weights={"dice": 0.5})
    total = loss_fn(logits, target)
    parts = {"ce": ce(logits, target), "dice": dice(logits, target)}
    assert total.item() == pytest.approx((parts["ce"] + 0.5 * parts["dice"]).item(), rel=1e-6)
    assert set(loss_fn.last_parts) == {"ce", "dice"}
    assert loss_fn.last_parts["dice"].item() == pytest.approx(parts["dice"].item(), rel=1e-6)
    assert loss_fn.parts(logits, target)["ce"].item() == pytest.approx(parts["ce"].item())


def test_combined_loss_rejects_weights_for_unknown_terms():
    with pytest.raises(KeyError, match="lovasz"):
        CombinedLoss({"ce": CrossEntropyLoss()}, weights={"lovasz": 1.0})


# --------------------------------------------------------------------- contract over all losses
@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_loss_ignores_logits_at_ignored_pixels(name):
    loss_fn = ALL_LOSSES[name]()
    logits, target = random_batch(seed=7)
    changed = logits.clone()
    noise = torch.randn(changed.shape, generator=torch.Generator().manual_seed(8)) * 10
    ignored = (target == IGNORE).unsqueeze(1).expand_as(changed)
    changed[ignored] += noise[ignored]
    changed.requires_grad_(True)
    loss = loss_fn(changed, target)
    assert loss.item() == pytest.approx(loss_fn(logits, target).item(), rel=1e-6, abs=1e-7)
    loss.backward()
    assert changed.grad[ignored].abs().max().item() == 0.0


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_loss_gradients_are_finite_and_nonzero_even_for_large_logits(name):
    logits, target = random_batch(seed=9, scale=30.0)
    logits.requires_grad_(True)
    loss = ALL_LOSSES[name]()(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_all_ignored_batch_gives_zero_loss_with_working_backward(name):
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), IGNORE, dtype=torch.int64)
    loss = ALL_LOSSES[name]()(logits, target)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
def test_bf16_logits_give_the_float32_loss_of_the_same_values(name):
    logits, target = random_batch(seed=10)
    half = logits.bfloat16().requires_grad_(True)
    loss_fn = ALL_LOSSES[name]()
    loss = loss_fn(half, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(half.detach().float(), target).item(), rel=1e-6)
    loss.backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()


# ------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted((CONF / "loss").glob("*.yaml")), ids=lambda p: p.stem)
def test_loss_config_instantiates_and_prefers_the_right_answer(path):
    cfg = OmegaConf.create(
        {"dataset": {"ignore_index": IGNORE, "num_classes": 4}, "loss": OmegaConf.load(path)}
    )
    loss_fn = instantiate(cfg.loss)
    logits, target = random_batch(seed=11)
    logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    perfect = 20.0 * F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    assert loss_fn(perfect, target).item() < 0.1 * loss.item()
