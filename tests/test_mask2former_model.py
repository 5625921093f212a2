"""Mask2Former's network and inference rules: shapes at odd sizes, masked attention that really
masks, deep supervision, gradients everywhere, and the paper's semantic / panoptic / instance
post-processing on hand-made query predictions."""

from __future__ import annotations

import pytest
import torch

from segtrain.models.mask2former.inference import panoptic_segments, semantic_scores, top_instances
from segtrain.models.mask2former.model import build_mask2former
from segtrain.models.mask2former.pixel_decoder import (
    FPNPixelDecoder,
    MSDeformAttnPixelDecoder,
    sine_position_embedding,
)
from segtrain.models.mask2former.transformer_decoder import MaskedAttentionDecoder

SMALL = {"backbone": "resnet18", "hidden_dim": 32, "mask_dim": 32, "num_queries": 6, "nheads": 4,
         "dim_feedforward": 64, "dec_layers": 4, "enc_layers": 2, "enc_dim_feedforward": 64,
         "num_points": 128}


def _features(size=(96, 160), channels=(16, 24, 40, 48), batch=2):
    h, w = size
    return [torch.randn(batch, c, -(-h // s), -(-w // s)) for c, s in zip(channels, (4, 8, 16, 32))]


@pytest.mark.parametrize("decoder_cls", [MSDeformAttnPixelDecoder, FPNPixelDecoder])
@pytest.mark.parametrize("size", [(96, 160), (70, 45)])
def test_pixel_decoders_give_stride_4_mask_features_and_three_coarse_levels(decoder_cls, size):
    torch.manual_seed(0)
    features = _features(size)
    kwargs = {"num_layers": 1, "ffn_dim": 64} if decoder_cls is MSDeformAttnPixelDecoder else {}
    decoder = decoder_cls([f.shape[1] for f in features], 32, 24, **kwargs)
    mask_features, levels = decoder(features)
    assert mask_features.shape == (2, 24, *features[0].shape[-2:])
    assert [tuple(x.shape[-2:]) for x in levels] == [tuple(f.shape[-2:]) for f in features[:0:-1]]
    assert all(x.shape[:2] == (2, 32) for x in levels)


def test_pixel_decoder_refuses_three_levels():
    with pytest.raises(ValueError, match="4 backbone levels"):
        MSDeformAttnPixelDecoder([8, 16, 32])


def test_sine_embedding_is_the_detr_formula():
    pos = sine_position_embedding(torch.zeros(1, 8, 3, 5), num_feats=4)
    assert pos.shape == (1, 8, 3, 5)
    # y features first: channel 0 = sin(y / 1), y = (row + 1) / 3 * 2 pi; channel 4 = sin(x)
    rows = torch.arange(1, 4) / (3 + 1e-6) * 2 * torch.pi
    cols = torch.arange(1, 6) / (5 + 1e-6) * 2 * torch.pi
    torch.testing.assert_close(pos[0, 0, :, 0], rows.sin())
    torch.testing.assert_close(pos[0, 1, :, 0], rows.cos())
    torch.testing.assert_close(pos[0, 4, 0, :], cols.sin())
    torch.testing.assert_close(pos[0, 2, :, 2], (rows / 100).sin())  # dim_t = 10000^(2*1/4)


def test_decoder_predicts_every_layer_and_masked_attention_ignores_pixels_outside_the_mask():
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(num_classes=5, in_channels=32, hidden_dim=32, num_queries=4, heads=4,
                                     ffn_dim=64, dec_layers=3, mask_dim=32).eval()
    levels = [torch.randn(1, 32, 4, 4), torch.randn(1, 32, 8, 8), torch.randn(1, 32, 16, 16)]
    mask_features = torch.randn(1, 32, 32, 32)
    out = decoder(levels, mask_features)
    assert out["pred_logits"].shape == (1, 4, 6) and out["pred_masks"].shape == (1, 4, 32, 32)
    assert len(out["aux_outputs"]) == 2  # dec_layers 3: the queries' own prediction + 1 layer
    # Layer 1 attends to level 0 (4x4) through the queries' own masks: changing level-0 pixels
    # that no query's mask covers changes nothing, changing covered ones does.
    with torch.no_grad():
        _, _, attn = decoder._predict(decoder.query_feat.weight[:, None], mask_features, (4, 4))
    blocked = attn.view(1, 4, 4, 16)[0, 0].all(0)  # (16,) pixels no query of head 0 sees
    assert 0 < int(blocked.sum()) < 16, "the random masks should cover some level-0 pixels only"
    changed = [level.clone() for level in levels]
    changed[0].view(1, 32, 16)[..., blocked] += 5.0
    again = decoder(changed, mask_features)["aux_outputs"][1]
    torch.testing.assert_close(again["pred_logits"], out["aux_outputs"][1]["pred_logits"])
    changed[0].view(1, 32, 16)[..., ~blocked] += 5.0
    moved = decoder(changed, mask_features)["aux_outputs"][1]["pred_logits"]
    assert not torch.allclose(moved, out["aux_outputs"][1]["pred_logits"])


def test_training_reaches_every_parameter_and_eval_gives_query_predictions():
    torch.manual_seed(0)
    model = build_mask2former(4, **SMALL)
    images = torch.randn(2, 3, 64, 96)
    targets = [{"labels": torch.tensor([1, 3]), "masks": torch.rand(2, 64, 96) > 0.5,
                "ignore": torch.zeros(64, 96, dtype=torch.bool)},
               {"labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 64, 96, dtype=torch.bool)}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):  # sampling offsets start at zero weight: the level embeddings learn from step 2
        losses = model(images, targets)
        assert set(losses) == {f"{n}{s}" for n in ("loss_ce", "loss_mask", "loss_dice")
                               for s in ("", "_0", "_1", "_2")}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    out = model.eval()(images)
    assert set(out) == {"pred_logits", "pred_masks"}
    assert out["pred_logits"].shape == (2, 6, 5) and out["pred_masks"].shape == (2, 6, 16, 24)


def test_build_errors_name_the_key():
    with pytest.raises(ValueError, match="model.pixel_decoder"):
        build_mask2former(3, pixel_decoder="deformable", **{k: v for k, v in SMALL.items()})
    with pytest.raises(ValueError, match="model.hidden_dim"):
        build_mask2former(3, **{**SMALL, "hidden_dim": 48})
    with pytest.raises(ValueError, match="model.num_queries"):
        build_mask2former(3, **{**SMALL, "num_queries": 0})


# ------------------------------------------------------------------------------ inference rules
def _queries(classes: list[int], num_classes: int, masks: torch.Tensor, confidence: float = 8.0):
    """Class logits making each query confident of its class (num_classes = no object)."""
    logits = torch.zeros(len(classes), num_classes + 1)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = confidence
    return logits, torch.where(masks, 10.0, -10.0)


def test_semantic_scores_are_class_probability_times_mask_probability():
    torch.manual_seed(0)
    logits, masks = torch.randn(5, 4), torch.randn(5, 6, 7)
    expected = torch.zeros(3, 6, 7)
    for q in range(5):
        expected += logits[q].softmax(-1)[:3, None, None] * masks[q].sigmoid()
    torch.testing.assert_close(semantic_scores(logits, masks), expected)


def test_panoptic_merge_keeps_confident_queries_joins_stuff_and_drops_hidden_ones():
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    masks[0, :, :4] = True          # stuff class 0, left half
    masks[1, :4, 4:] = True         # stuff class 0 again: joins query 0's segment
    masks[2, 4:, 4:] = True         # thing class 2
    masks[3, 4:, 4:] = True         # thing class 2, same pixels, weaker: loses them all -> dropped
    masks[4, 0:2, 0:2] = True       # "no object": never placed
    masks[5, 6:, 0:2] = True        # thing class 3 but unsure (score < 0.8): dropped
    logits, mask_logits = _queries([0, 0, 2, 2, 4, 3], 4, masks)
    logits[3, 2] = 6.0
    logits[5] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    panoptic, segments = panoptic_segments(logits, mask_logits, thing_classes=[2, 3])
    assert [(s["category_id"], s["isthing"]) for s in segments] == [(0, False), (2, True)]
    assert bool((panoptic[:, :4] == 1).all()) and bool((panoptic[:4, 4:] == 1).all())
    assert bool((panoptic[4:, 4:] == 2).all())
    assert segments[1]["score"] == pytest.approx(logits[2].softmax(-1)[2].item())


def test_panoptic_merge_overlap_rule():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :, :] = True     # a strong query over everything
    masks[1, :, :6] = True    # a weaker one: it wins no pixel where query 0 is surer
    logits, mask_logits = _queries([2, 3], 4, masks)
    logits[1, 3] = 20.0       # now query 1 is the surer one on its 48 pixels
    panoptic, segments = panoptic_segments(logits, mask_logits, [2, 3], overlap_threshold=0.8)
    # query 0 keeps 16 of its 64 pixels (25% < 80%): dropped, its pixels stay VOID
    assert [s["category_id"] for s in segments] == [3]
    assert int((panoptic == 1).sum()) == 48 and int((panoptic == 0).sum()) == 16
    panoptic, segments = panoptic_segments(logits, mask_logits, [2, 3], overlap_threshold=0.2)
    assert sorted(s["category_id"] for s in segments) == [2, 3]


def test_top_instances_rank_query_class_pairs_over_thing_classes_only():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    logits, mask_logits = _queries([1, 2, 0], 3, masks)  # class 0 is stuff: never an instance
    found = top_instances(logits, mask_logits, thing_classes=[1, 2], topk=4)
    assert len(found["scores"]) == 4 and bool((found["scores"][:-1] >= found["scores"][1:]).all())
    assert found["classes"][:2].tolist() in ([1, 2], [2, 1])
    assert set(found["classes"].tolist()) <= {1, 2}
    best = found["masks"][0]
    assert torch.equal(best, masks[0]) or torch.equal(best, masks[1])
    # score = p(class) * mean mask probability inside the mask
    p = logits[0].softmax(-1)[1]
    expected = p * torch.sigmoid(torch.tensor(10.0))
    assert float(found["scores"][0]) == pytest.approx(float(expected), rel=1e-5)


def test_bf16_autocast_trains_with_float32_losses_and_finite_gradients():
    torch.manual_seed(0)
    model = build_mask2former(4, **SMALL).train()
    targets = [{"labels": torch.tensor([1, 2]), "masks": torch.rand(2, 64, 64) > 0.5}] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(torch.randn(2, 3, 64, 64), targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the deformable pixel decoder runs in float32 under autocast, as the official one
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        features = model.backbone(torch.randn(1, 3, 64, 64))
        mask_features, levels = model.pixel_decoder(features)
    assert features[0].dtype == torch.bfloat16
    assert mask_features.dtype == torch.float32 and all(x.dtype == torch.float32 for x in levels)


def test_query_tables_get_no_weight_decay_and_biases_follow_bias_weight_decay():
    from segtrain.optim import build_param_groups

    model = build_mask2former(4, **SMALL)
    groups = build_param_groups(model, lr=1e-4, weight_decay=0.05, norm_weight_decay=0.0,
                                bias_weight_decay=0.05, backbone_lr_mult=0.1)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("predictor.query_feat.weight", "predictor.query_embed.weight",
                 "predictor.level_embed.weight", "predictor.decoder_norm.weight"):
        assert decay_of[id(named[name])] == 0.0, name
    for name in ("predictor.class_embed.bias", "pixel_decoder.transformer.level_embed",
                 "predictor.class_embed.weight"):
        assert decay_of[id(named[name])] == 0.05, name  # as the official code decays them
