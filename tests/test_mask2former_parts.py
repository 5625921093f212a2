"""Mask2Former's parts against direct references: deformable attention against a loop of bilinear
samples (forward and gradients), the matcher against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from segtrain.models.mask2former.matcher import HungarianMatcher, dice_cost, sigmoid_ce_cost
from segtrain.models.mask2former.ms_deform_attn import MSDeformAttn, ms_deform_attn

SHAPES = [(7, 9), (4, 5), (2, 3)]  # odd sizes on purpose


def _bilinear(level: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """level (D, h, w) at continuous (x, y) in [0, 1] (edges of the border pixels); zero outside."""
    dim, h, w = level.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px.detach()), math.floor(py.detach())
    out = level.new_zeros(dim)
    for xx, yy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xx < w and 0 <= yy < h:
            out = out + level[:, yy, xx] * (1 - (px - xx).abs()) * (1 - (py - yy).abs())
    return out


def _loop_reference(value, shapes, locations, weights):
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    rows = []
    for n in range(batch):
        for q in range(queries):
            head_outs = []
            for m in range(heads):
                acc = value.new_zeros(dim)
                for lv, (h, w) in enumerate(shapes):
                    level = per_level[lv][n, :, m].T.reshape(dim, h, w)
                    for p in range(points):
                        x, y = locations[n, q, m, lv, p]
                        acc = acc + weights[n, q, m, lv, p] * _bilinear(level, x, y)
                head_outs.append(acc)
            rows.append(torch.cat(head_outs))
    return torch.stack(rows).view(batch, queries, heads * dim)


def test_deformable_attention_equals_the_loop_forward_and_backward():
    torch.manual_seed(0)
    batch, queries, heads, dim, points = 2, 3, 2, 4, 2
    value = torch.randn(batch, sum(h * w for h, w in SHAPES), heads, dim, dtype=torch.float64,
                        requires_grad=True)
    # some locations outside [0, 1]: they must read zeros there
    locations = (torch.rand(batch, queries, heads, len(SHAPES), points, 2, dtype=torch.float64) * 1.2 - 0.1
                 ).requires_grad_()
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, dtype=torch.float64, requires_grad=True)
    fast = ms_deform_attn(value, SHAPES, locations, weights)
    slow = _loop_reference(value, SHAPES, locations, weights)
    torch.testing.assert_close(fast, slow)
    upstream = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), (value, locations, weights))
    grads_slow = torch.autograd.grad((slow * upstream).sum(), (value, locations, weights))
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b)


def test_deformable_attention_module_shapes_padding_and_gradients():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, levels=3, heads=4, points=2)
    total = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 5, 16), torch.randn(2, total, 16)
    reference = torch.rand(2, 5, 3, 2)
    out = attn(query, reference, value, SHAPES)
    assert out.shape == (2, 5, 16)
    out.square().sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # everything padded: only the output projection's bias is left
    padded = attn(query, reference, value, SHAPES, padding=torch.ones(2, total, dtype=torch.bool))
    torch.testing.assert_close(padded, attn.output_proj.bias.expand_as(padded).detach(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        attn(query, reference, value[:, :-1], SHAPES)


def test_mask_costs_equal_per_pair_losses():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 50), (torch.rand(3, 50) > 0.5).float()
    ce, dice = sigmoid_ce_cost(logits, targets), dice_cost(logits, targets)
    for q, t in itertools.product(range(4), range(3)):
        expected_ce = F.binary_cross_entropy_with_logits(logits[q], targets[t])
        p = logits[q].sigmoid()
        expected_dice = 1 - (2 * (p * targets[t]).sum() + 1) / (p.sum() + targets[t].sum() + 1)
        torch.testing.assert_close(ce[q, t], expected_ce)
        torch.testing.assert_close(dice[q, t], expected_dice)


def _random_case(seed: int, queries: int, count: int, crowd: list[bool] | None = None):
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(1, queries, 5, generator=g)
    mask_logits = torch.randn(1, queries, 8, 8, generator=g) * 3
    target = {"labels": torch.randint(0, 4, (count,), generator=g),
              "masks": torch.rand(count, 16, 16, generator=g) > 0.6}
    if crowd is not None:
        target["iscrowd"] = torch.tensor(crowd)
    return class_logits, mask_logits, target


@pytest.mark.parametrize(("seed", "queries", "count"), [(0, 5, 3), (1, 6, 2), (2, 4, 4), (3, 3, 5)])
def test_matching_is_the_brute_force_optimum(seed, queries, count):
    matcher = HungarianMatcher(num_points=64)
    class_logits, mask_logits, target = _random_case(seed, queries, count)
    cost = matcher.cost_matrix(class_logits[0], mask_logits[0], target, torch.Generator().manual_seed(7))
    rows, cols = matcher.match(class_logits, mask_logits, [target], torch.Generator().manual_seed(7))[0]
    assert len(rows) == min(queries, count) and len(set(rows.tolist())) == len(rows)
    got = cost[rows, cols].sum()
    # every injective pairing of min(Q, T) queries and targets
    if count <= queries:
        pairings = [(qs, range(count)) for qs in itertools.permutations(range(queries), count)]
    else:
        pairings = [(range(queries), ts) for ts in itertools.permutations(range(count), queries)]
    best = min(sum(cost[q, t] for q, t in zip(qs, ts)) for qs, ts in pairings)
    torch.testing.assert_close(got, torch.as_tensor(best, dtype=got.dtype))


def test_empty_images_and_crowds_are_never_matched():
    matcher = HungarianMatcher(num_points=64)
    class_logits, mask_logits, target = _random_case(4, 5, 3, crowd=[False, True, False])
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)}
    all_crowd = {**target, "iscrowd": torch.ones(3, dtype=torch.bool)}
    logits2, masks2 = class_logits.repeat(3, 1, 1), mask_logits.repeat(3, 1, 1, 1)
    matches = matcher.match(logits2, masks2, [target, empty, all_crowd])
    rows, cols = matches[0]
    assert sorted(cols.tolist()) == [0, 2], "indices into the full list, the crowd left out"
    for rows, cols in matches[1:]:
        assert len(rows) == len(cols) == 0
    with pytest.raises(ValueError, match="costs"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


def _perfect_outputs(target: dict, queries: int = 4, num_classes: int = 3, size: int = 16) -> dict:
    """Query i predicts segment i exactly (very confident); the rest predict no object."""
    logits = torch.full((1, queries, num_classes + 1), -20.0)
    logits[0, :, num_classes] = 20.0
    masks = torch.full((1, queries, size, size), -20.0)
    for i, (label, mask) in enumerate(zip(target["labels"], target["masks"])):
        logits[0, i, num_classes], logits[0, i, label] = -20.0, 20.0
        masks[0, i] = torch.where(mask, 20.0, -20.0)
    return {"pred_logits": logits, "pred_masks": masks}


def _segments() -> dict:
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 2:8, 2:8] = True
    masks[1, 9:15, 4:14] = True
    return {"labels": torch.tensor([2, 0]), "masks": masks}


def test_uncertain_points_favour_the_mask_edges():
    from segtrain.models.mask2former.criterion import uncertain_points

    # |logit| grows with the distance to column 16: the most uncertain quarter lies within 4 px
    logits = (torch.arange(32.0) + 0.5 - 16.0).abs().expand(1, 32, 32)
    points = uncertain_points(logits, 400, oversample=3.0, importance=0.75,
                              generator=torch.Generator().manual_seed(0))
    assert points.shape == (1, 400, 2) and bool(((points >= 0) & (points <= 1)).all())
    near = ((points[0, :, 0] * 32 - 16.0).abs() < 4.5).float().mean()
    assert near > 0.7, f"{near:.2f}: uniform points would give 0.28"


def test_perfect_predictions_cost_nothing_and_wrong_ones_do():
    from segtrain.models.mask2former.criterion import SetCriterion

    criterion = SetCriterion(num_classes=3, num_points=4096)
    target = _segments()
    perfect = _perfect_outputs(target)
    torch.manual_seed(0)
    losses = criterion({**perfect, "aux_outputs": [perfect]}, [target])
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    assert float(losses["loss_ce"]) < 1e-3 and float(losses["loss_ce_0"]) < 1e-3
    wrong = _perfect_outputs({"labels": torch.tensor([1, 1]), "masks": target["masks"].flip(-1)})
    torch.manual_seed(0)
    bad = criterion(wrong, [target])
    assert float(bad["loss_ce"]) > 1.0
    # Points sampled at the edges see interpolated targets, so even perfect masks cost a little.
    for key in ("loss_mask", "loss_dice"):
        assert float(bad[key]) > 3 * float(losses[key]), (key, bad[key], losses[key])


def test_no_object_weight_is_the_class_weight_of_unmatched_queries():
    from segtrain.models.mask2former.criterion import SetCriterion

    criterion = SetCriterion(num_classes=3, num_points=64, class_weight=1.0)
    target = _segments()
    outputs = _perfect_outputs(target)
    outputs["pred_logits"] = torch.randn(1, 4, 4)
    matches = criterion.matcher.match(outputs["pred_logits"], outputs["pred_masks"], [target])
    classes = torch.full((1, 4), 3)
    classes[0, matches[0][0]] = target["labels"][matches[0][1]]
    expected = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), classes,
                               torch.tensor([1.0, 1.0, 1.0, 0.1]))
    torch.testing.assert_close(criterion(outputs, [target])["loss_ce"], expected)


def test_crowd_pixels_count_in_no_mask_loss():
    from segtrain.models.mask2former.criterion import SetCriterion

    criterion = SetCriterion(num_classes=3, num_points=4096, importance=0.0)
    target = _segments()
    crowd = torch.zeros(16, 16, dtype=torch.bool)
    crowd[2:8, 8:10] = True  # a crowd region next to segment 0
    with_crowd = {"labels": torch.tensor([2, 0, 1]), "masks": torch.cat([target["masks"], crowd[None]]),
                  "iscrowd": torch.tensor([False, False, True])}
    exact = _perfect_outputs(target)
    over = _perfect_outputs(target)
    over["pred_masks"][0, 0, 2:8, 8:10] = 20.0  # segment 0's query also covers the crowd
    results = []
    for outputs, targets in ((exact, target), (over, target), (over, with_crowd)):
        torch.manual_seed(0)
        results.append(criterion(outputs, [targets]))
        assert float(results[-1]["loss_ce"]) < 1e-3, "query i is matched to segment i"
    exact_loss, plain, ignored = results
    assert float(plain["loss_mask"]) > 2 * float(exact_loss["loss_mask"]), "the extra area is wrong"
    for key in ("loss_mask", "loss_dice"):  # inside the crowd it is not
        assert float(ignored[key]) < 1.2 * float(exact_loss[key]) + 1e-3, (key, ignored[key], exact_loss[key])
