"""Mask2Former's parts against Hugging Face `transformers`' independent implementation
(transformers.models.mask2former.modeling_mask2former), given identical weights (ours copied into
theirs through the name map below) and identical inputs: deformable attention, the pixel decoder,
the masked-attention decoder (every layer's class and mask logits), the matcher's costs and
assignment, and the loss (class CE, BCE and dice on the same points; the whole seeded criterion).

Both follow the official facebookresearch/Mask2Former code. Where transformers differs from it in
a way that matters here, the test says so at the spot. Dropout is 0 and every module is in eval
mode; the networks run in float64 (atol 1e-9 or tighter), the matcher and the loss in float32 (as
both compute them; atol 1e-5).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import Mask2FormerConfig  # noqa: E402
from transformers.models.mask2former import modeling_mask2former as hf  # noqa: E402

from segtrain.models.mask2former import criterion as criterion_module  # noqa: E402
from segtrain.models.mask2former.criterion import SetCriterion, uncertain_points  # noqa: E402
from segtrain.models.mask2former.matcher import (  # noqa: E402
    HungarianMatcher,
    dice_cost,
    point_sample,
    sigmoid_ce_cost,
)
from segtrain.models.mask2former.ms_deform_attn import MSDeformAttn, ms_deform_attn  # noqa: E402
from segtrain.models.mask2former.pixel_decoder import (  # noqa: E402
    DeformableEncoderLayer,
    MSDeformAttnPixelDecoder,
    _reference_points,
    sine_position_embedding,
)
from segtrain.models.mask2former.transformer_decoder import MaskedAttentionDecoder  # noqa: E402

HIDDEN, HEADS, QUERIES, CLASSES = 64, 4, 10, 5
ENC_LAYERS, ENC_FFN, DEC_LAYERS, DEC_FFN = 2, 128, 4, 128  # DEC_LAYERS 4: 3 layers, all 3 levels
CHANNELS = [32, 48, 64, 96]  # backbone strides 4, 8, 16, 32
# a 64 x 80 image: stride 4 is 16 x 20, the encoder's levels 8 x 10, 4 x 5, 2 x 3 (odd on purpose)
SIZES = [(16, 20), (8, 10), (4, 5), (2, 3)]
ATOL64 = 1e-9
ATOL32 = 1e-5


def _config(**overrides) -> Mask2FormerConfig:
    # backbone_config is only read when a backbone is built; the parts here never build one
    kwargs = dict(feature_size=HIDDEN, mask_feature_size=HIDDEN, hidden_dim=HIDDEN,
                  encoder_feedforward_dim=ENC_FFN, encoder_layers=ENC_LAYERS, decoder_layers=DEC_LAYERS,
                  num_attention_heads=HEADS, dropout=0.0, dim_feedforward=DEC_FFN, num_queries=QUERIES,
                  num_labels=CLASSES, feature_strides=[4, 8, 16, 32], common_stride=4,
                  train_num_points=64 * 4, oversample_ratio=3.0, importance_sample_ratio=0.75)
    kwargs.update(overrides)
    return Mask2FormerConfig(**kwargs)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter: the inits' zeros (attention weights, biases) would hide mix-ups."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.1)


def _load(theirs: torch.nn.Module, mapped: dict[str, torch.Tensor]) -> None:
    """Strict: every parameter of theirs comes from ours; the maps raise on any key of ours they
    do not know, so none of ours is left over either."""
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected, (missing, unexpected)


# --- name maps: our (official) names -> transformers' ------------------------------------------

_ENCODER_LAYER = {"norm1.": "self_attn_layer_norm.", "linear1.": "fc1.", "linear2.": "fc2.",
                  "norm2.": "final_layer_norm."}


def _map_encoder_layer(key: str) -> str:
    for ours, theirs in _ENCODER_LAYER.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key  # self_attn.{sampling_offsets, attention_weights, value_proj, output_proj} as is


def _map_pixel_decoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("input_proj."):
            new = "input_projections." + key[len("input_proj."):]
        elif key == "transformer.level_embed":
            new = "level_embed"
        elif key.startswith("transformer.encoder.layers."):
            index, rest = key[len("transformer.encoder.layers."):].split(".", 1)
            new = f"encoder.layers.{index}.{_map_encoder_layer(rest)}"
        elif key.startswith(("adapter_1.", "layer_1.")):
            # detectron2's Conv2d(norm=) -> Sequential(conv, GroupNorm[, ReLU])
            name, rest = key.split(".", 1)
            new = f"{name}.1.{rest[len('norm.'):]}" if rest.startswith("norm.") else f"{name}.0.{rest}"
        elif key.startswith("mask_features."):
            new = "mask_projection." + key[len("mask_features."):]
        else:
            raise AssertionError(f"unmapped pixel decoder key {key}")
        out[new] = value
    return out


def _map_transformer_decoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MaskedAttentionDecoder -> their Mask2FormerTransformerModule, plus "class_predictor."
    (which lives in their Mask2FormerForUniversalSegmentation)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "transformer_cross_attention_layers":
            i, rest = parts[1], ".".join(parts[2:])
            rest = rest.replace("multihead_attn.", "cross_attn.").replace("norm.", "cross_attn_layer_norm.")
            out[f"decoder.layers.{i}.{rest}"] = value
        elif parts[0] == "transformer_self_attention_layers":
            i, rest = parts[1], ".".join(parts[2:])
            prefix = f"decoder.layers.{i}."
            if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
                # nn.MultiheadAttention's packed q, k, v -> their separate projections
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = chunk
            elif rest.startswith("self_attn.out_proj."):
                out[prefix + rest] = value
            else:
                out[prefix + rest.replace("norm.", "self_attn_layer_norm.")] = value
        elif parts[0] == "transformer_ffn_layers":
            i, rest = parts[1], ".".join(parts[2:])
            for old, new in (("linear1.", "fc1."), ("linear2.", "fc2."), ("norm.", "final_layer_norm.")):
                rest = rest.replace(old, new)
            out[f"decoder.layers.{i}.{rest}"] = value
        elif parts[0] == "decoder_norm":
            out["decoder.layernorm." + parts[1]] = value
        elif parts[0] == "query_feat":
            out["queries_features.weight"] = value
        elif parts[0] == "query_embed":
            out["queries_embedder.weight"] = value
        elif parts[0] == "level_embed":
            out["level_embed.weight"] = value
        elif parts[0] == "mask_embed":
            out[f"decoder.mask_predictor.mask_embedder.{parts[2]}.0.{parts[3]}"] = value
        elif parts[0] == "input_proj":  # 1x1 convs, only when in_channels != hidden_dim
            out[f"input_projections.{parts[1]}.{parts[2]}"] = value
        elif parts[0] == "class_embed":
            out["class_predictor." + parts[1]] = value
        else:
            raise AssertionError(f"unmapped transformer decoder key {key}")
    return out


# --- fixtures ----------------------------------------------------------------------------------

def _features(dtype=torch.float64, batch=2, seed=1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=generator, dtype=dtype)
            for c, (h, w) in zip(CHANNELS, SIZES)]


def _pixel_decoders():
    torch.manual_seed(0)
    ours = MSDeformAttnPixelDecoder(CHANNELS, HIDDEN, HIDDEN, HEADS, 4, ENC_FFN, ENC_LAYERS, 0.0)
    _perturb(ours, 10)
    theirs = hf.Mask2FormerPixelDecoder(_config(), feature_channels=CHANNELS)
    _load(theirs, _map_pixel_decoder(ours.state_dict()))
    return ours.double().eval(), theirs.double().eval()


def _transformer_decoders(in_channels=HIDDEN):
    torch.manual_seed(0)
    ours = MaskedAttentionDecoder(CLASSES, in_channels, HIDDEN, QUERIES, HEADS, DEC_FFN, DEC_LAYERS, HIDDEN,
                                  0.0)
    _perturb(ours, 11)
    mapped = _map_transformer_decoder(ours.state_dict())
    theirs = hf.Mask2FormerTransformerModule(in_features=in_channels, config=_config())
    classifier = torch.nn.Linear(HIDDEN, CLASSES + 1)
    head = "class_predictor."
    _load(classifier, {k[len(head):]: v for k, v in mapped.items() if k.startswith(head)})
    _load(theirs, {k: v for k, v in mapped.items() if not k.startswith(head)})
    return ours.double().eval(), theirs.double().eval(), classifier.double().eval()


# --- multi-scale deformable attention ----------------------------------------------------------

def test_ms_deform_attn_function_matches_transformers():
    generator = torch.Generator().manual_seed(0)
    shapes = SIZES[1:]
    value = torch.randn(2, sum(h * w for h, w in shapes), HEADS, 8, generator=generator, dtype=torch.float64)
    # some locations outside [0, 1]: both read zeros there
    locations = torch.rand(2, 7, HEADS, 3, 4, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, 7, HEADS, 3, 4, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(ms_deform_attn(value, shapes, locations, weights),
                               hf.multi_scale_deformable_attention(value, shapes, locations, weights),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_ms_deform_attn_module_matches_transformers(padded):
    torch.manual_seed(0)
    shapes = SIZES[1:]
    ours = MSDeformAttn(HIDDEN, 3, HEADS, 4)
    _perturb(ours, 3)
    theirs = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(HIDDEN, HEADS, 3, 4)
    _load(theirs, ours.state_dict())  # the same names (the official ones)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    generator = torch.Generator().manual_seed(1)
    length = sum(h * w for h, w in shapes)
    query = torch.randn(2, 9, HIDDEN, generator=generator, dtype=torch.float64)
    value = torch.randn(2, length, HIDDEN, generator=generator, dtype=torch.float64)
    reference = torch.rand(2, 9, 3, 2, generator=generator, dtype=torch.float64)
    padding = (torch.rand(2, length, generator=generator) < 0.2) if padded else None
    with torch.no_grad():
        mine = ours(query, reference, value, shapes, padding)
        # theirs: `attention_mask` True where value is padding (the official `input_padding_mask`)
        ref, _ = theirs(hidden_states=query, attention_mask=padding, encoder_hidden_states=value,
                        reference_points=reference, spatial_shapes_list=shapes)
    torch.testing.assert_close(mine, ref, rtol=0, atol=ATOL64)


# --- pixel decoder -----------------------------------------------------------------------------

def test_position_embedding_and_reference_points_match_transformers():
    x = torch.zeros(2, HIDDEN, 5, 7, dtype=torch.float64)
    embedder = hf.Mask2FormerSinePositionEmbedding(num_position_features=HIDDEN // 2, normalize=True)
    torch.testing.assert_close(sine_position_embedding(x, HIDDEN // 2),
                               embedder(x.shape, x.device, x.dtype), rtol=0, atol=1e-12)
    shapes = SIZES[1:]
    ref = hf.Mask2FormerPixelDecoderEncoderOnly.get_reference_points(
        shapes, torch.ones(1, 3, 2, dtype=torch.float64), device="cpu")
    torch.testing.assert_close(_reference_points(shapes, torch.device("cpu"), torch.float64)[None], ref,
                               rtol=0, atol=1e-12)


def test_deformable_encoder_layer_matches_transformers():
    torch.manual_seed(0)
    shapes = SIZES[1:]
    ours = DeformableEncoderLayer(HIDDEN, HEADS, 3, 4, ENC_FFN, 0.0)
    _perturb(ours, 4)
    theirs = hf.Mask2FormerPixelDecoderEncoderLayer(_config())
    _load(theirs, {_map_encoder_layer(k): v for k, v in ours.state_dict().items()})
    ours, theirs = ours.double().eval(), theirs.double().eval()
    generator = torch.Generator().manual_seed(2)
    length = sum(h * w for h, w in shapes)
    x = torch.randn(2, length, HIDDEN, generator=generator, dtype=torch.float64)
    pos = torch.randn(2, length, HIDDEN, generator=generator, dtype=torch.float64)
    reference = _reference_points(shapes, x.device, x.dtype)[None].expand(2, -1, -1, -1)
    with torch.no_grad():
        mine = ours(x, pos, reference, shapes)
        ref = theirs(x, None, position_embeddings=pos, reference_points=reference,
                     spatial_shapes_list=shapes)[0]
    torch.testing.assert_close(mine, ref, rtol=0, atol=ATOL64)


def test_pixel_decoder_matches_transformers():
    ours, theirs = _pixel_decoders()
    features = _features()
    with torch.no_grad():
        mask_features, levels = ours(features)
        ref = theirs(features, output_hidden_states=False, output_attentions=False, return_dict=True)
    # both give the 3 encoder levels coarsest first (strides 32, 16, 8), the official order
    assert [tuple(x.shape[-2:]) for x in levels] == [SIZES[3], SIZES[2], SIZES[1]]
    assert len(ref.multi_scale_features) == 3
    for mine, theirs_level in zip(levels, ref.multi_scale_features):
        torch.testing.assert_close(mine, theirs_level, rtol=0, atol=ATOL64)
    torch.testing.assert_close(mask_features, ref.mask_features, rtol=0, atol=ATOL64)


# --- masked-attention transformer decoder --------------------------------------------------------

@pytest.mark.parametrize("in_channels", [HIDDEN, 48])
def test_transformer_decoder_every_layer_matches_transformers(in_channels):
    """Fed by the pixel decoder; with in_channels != hidden_dim (the input projections), by
    random levels."""
    ours, theirs, classifier = _transformer_decoders(in_channels)
    with torch.no_grad():
        if in_channels == HIDDEN:
            mask_features, levels = _pixel_decoders()[0](_features())
        else:
            generator = torch.Generator().manual_seed(3)
            levels = [torch.randn(2, in_channels, h, w, generator=generator, dtype=torch.float64)
                      for h, w in SIZES[:0:-1]]
            mask_features = torch.randn(2, HIDDEN, *SIZES[0], generator=generator, dtype=torch.float64)
        out = ours(levels, mask_features)
        ref = theirs(multi_scale_features=levels, mask_features=mask_features, output_hidden_states=True)
        # their class logits come from Mask2FormerForUniversalSegmentation.class_predictor applied to
        # every layer's layer-normed queries, as the official forward_prediction_heads
        ref_logits = [classifier(h.transpose(0, 1)) for h in ref.intermediate_hidden_states]
    mine = out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]
    assert len(mine) == len(ref_logits) == len(ref.masks_queries_logits) == DEC_LAYERS
    for layer, (pred, logits, masks) in enumerate(zip(mine, ref_logits, ref.masks_queries_logits)):
        torch.testing.assert_close(pred["pred_logits"], logits, rtol=0, atol=ATOL64, msg=f"layer {layer}")
        torch.testing.assert_close(pred["pred_masks"], masks, rtol=0, atol=ATOL64, msg=f"layer {layer}")
    # the masks do restrict attention here (not everything above or below 0.5)
    probs = out["aux_outputs"][1]["pred_masks"].sigmoid()
    assert 0.05 < float((probs < 0.5).double().mean()) < 0.95


# --- matcher -----------------------------------------------------------------------------------

def _predictions_and_targets(batch=2, seed=5):
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, QUERIES, CLASSES + 1, generator=generator) * 2
    mask_logits = torch.randn(batch, QUERIES, 16, 20, generator=generator) * 3
    targets = []
    for i in range(batch):
        count = 3 + i
        masks = torch.rand(count, 64, 80, generator=generator) < torch.rand(count, 1, 1, generator=generator)
        labels = torch.randint(0, CLASSES, (count,), generator=generator)
        targets.append({"labels": labels, "masks": masks})
    return class_logits, mask_logits, targets


def test_matcher_cost_pieces_match_transformers():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(QUERIES, 500, generator=generator) * 3
    targets = (torch.rand(4, 500, generator=generator) < 0.4).float()
    torch.testing.assert_close(sigmoid_ce_cost(logits, targets),
                               hf.pair_wise_sigmoid_cross_entropy_loss(logits, targets), rtol=0, atol=ATOL32)
    torch.testing.assert_close(dice_cost(logits, targets), hf.pair_wise_dice_loss(logits, targets),
                               rtol=0, atol=ATOL32)
    points = torch.rand(1, 50, 2, generator=generator)
    masks = torch.randn(3, 9, 11, generator=generator)
    torch.testing.assert_close(point_sample(masks, points),
                               hf.sample_point(masks[:, None], points.expand(3, -1, -1),
                                               align_corners=False)[:, 0],
                               rtol=0, atol=1e-6)


def test_matcher_cost_matrix_and_assignment_match_transformers():
    class_logits, mask_logits, targets = _predictions_and_targets()
    ours = HungarianMatcher(2.0, 5.0, 5.0, num_points=300)
    theirs = hf.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=300)
    # the same seed gives both the same points (one torch.rand(1, P, 2) per image, in image order)
    for i, target in enumerate(targets):
        torch.manual_seed(7 + i)
        cost = ours.cost_matrix(class_logits[i], mask_logits[i], target)
        torch.manual_seed(7 + i)
        points = torch.rand(1, 300, 2)
        pred = hf.sample_point(mask_logits[i][:, None], points.repeat(QUERIES, 1, 1),
                               align_corners=False)[:, 0]
        true = hf.sample_point(target["masks"].float()[:, None], points.repeat(len(target["labels"]), 1, 1),
                               align_corners=False)[:, 0]
        ref = (5.0 * hf.pair_wise_sigmoid_cross_entropy_loss(pred, true)
               - 2.0 * class_logits[i].softmax(-1)[:, target["labels"]]
               + 5.0 * hf.pair_wise_dice_loss(pred, true))
        torch.testing.assert_close(cost, ref, rtol=0, atol=ATOL32)
    torch.manual_seed(9)
    mine = ours.match(class_logits, mask_logits, targets)
    torch.manual_seed(9)
    ref = theirs(mask_logits, class_logits, [t["masks"].float() for t in targets],
                 [t["labels"] for t in targets])
    for (rows, cols), (ref_rows, ref_cols) in zip(mine, ref):
        assert rows.tolist() == ref_rows.tolist() and cols.tolist() == ref_cols.tolist()


# --- loss --------------------------------------------------------------------------------------

def _hf_loss(num_points=256):
    config = _config(train_num_points=num_points)
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    return hf.Mask2FormerLoss(config=config, weight_dict=weights)


def test_class_and_point_losses_match_transformers(monkeypatch):
    """Given matches and given points, the deterministic parts: CE with the no-object weight, BCE
    and dice on the points."""
    class_logits, mask_logits, targets = _predictions_and_targets()
    indices = [(torch.tensor([0, 3, 7]), torch.tensor([2, 0, 1])),
               (torch.tensor([1, 2, 4, 9]), torch.tensor([3, 1, 0, 2]))]
    generator = torch.Generator().manual_seed(8)
    points = [torch.rand(len(rows), 256, 2, generator=generator) for rows, _ in indices]
    ours = SetCriterion(CLASSES, HungarianMatcher(2.0, 5.0, 5.0, 256), 0.1, 2.0, 5.0, 5.0, 256)
    monkeypatch.setattr(ours.matcher, "match", lambda *args, **kwargs: indices)
    given = iter(points)
    monkeypatch.setattr(criterion_module, "uncertain_points", lambda *args, **kwargs: next(given))
    losses = ours({"pred_logits": class_logits, "pred_masks": mask_logits}, targets)

    theirs = _hf_loss()
    num_masks = 7
    ref_ce = theirs.loss_labels(class_logits, [t["labels"] for t in targets], indices)["loss_cross_entropy"]
    logit_points = torch.cat([hf.sample_point(mask_logits[i, rows][:, None], p, align_corners=False)[:, 0]
                              for i, ((rows, _), p) in enumerate(zip(indices, points))])
    label_points = torch.cat([hf.sample_point(targets[i]["masks"][cols].float()[:, None], p,
                                              align_corners=False)[:, 0]
                              for i, ((_, cols), p) in enumerate(zip(indices, points))])
    ref_bce = hf.sigmoid_cross_entropy_loss(logit_points, label_points, num_masks)
    ref_dice = hf.dice_loss(logit_points, label_points, num_masks)
    torch.testing.assert_close(losses["loss_ce"], 2.0 * ref_ce, rtol=0, atol=ATOL32)
    torch.testing.assert_close(losses["loss_mask"], 5.0 * ref_bce, rtol=0, atol=ATOL32)
    torch.testing.assert_close(losses["loss_dice"], 5.0 * ref_dice, rtol=0, atol=ATOL32)


def test_uncertain_points_match_transformers():
    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 16, 20, generator=generator) * 3
    torch.manual_seed(13)
    mine = uncertain_points(logits, 200, 3.0, 0.75)
    torch.manual_seed(13)
    theirs = _hf_loss().sample_points_using_uncertainty(logits[:, None], lambda x: -x.abs(), 200, 3.0, 0.75)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_whole_criterion_with_deep_supervision_matches_transformers():
    """Batch of 1, so that both draw their random points in the same order (transformers draws
    the uncertainty candidates for the whole batch at once, we per image): matching, uncertainty
    sampling, every loss of every layer."""
    class_logits, mask_logits, targets = _predictions_and_targets(batch=1, seed=14)
    generator = torch.Generator().manual_seed(15)
    aux = [{"pred_logits": torch.randn(1, QUERIES, CLASSES + 1, generator=generator),
            "pred_masks": torch.randn(1, QUERIES, 16, 20, generator=generator) * 3} for _ in range(3)]
    ours = SetCriterion(CLASSES, HungarianMatcher(2.0, 5.0, 5.0, 256), 0.1, 2.0, 5.0, 5.0, 256, 3.0, 0.75)
    torch.manual_seed(16)
    losses = ours({"pred_logits": class_logits, "pred_masks": mask_logits, "aux_outputs": aux}, targets)
    theirs = _hf_loss()
    torch.manual_seed(16)
    aux_theirs = [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]}
                  for a in aux]
    ref = theirs(mask_logits, class_logits, [t["masks"].float() for t in targets],
                 [t["labels"] for t in targets], auxiliary_predictions=aux_theirs)
    # theirs unweighted (Mask2FormerForUniversalSegmentation.get_loss_dict weights them), ours weighted
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    renamed = {}
    for key, value in ref.items():
        base = next(k for k in weights if key.startswith(k))
        renamed[key.replace("loss_cross_entropy", "loss_ce")] = weights[base] * value
    assert sorted(losses) == sorted(renamed)
    for key in losses:
        torch.testing.assert_close(losses[key], renamed[key].to(losses[key].dtype), rtol=0, atol=ATOL32,
                                   msg=key)

