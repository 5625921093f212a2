"""COCOeval with its two slow loops vectorised: the same `eval` arrays, several times faster.

pycocotools' `evaluateImg` runs one Python loop per (image, category, area range, IoU threshold,
detection, ground truth), and `accumulate` one per (category, area, maxDets, threshold,
detection). Here the greedy matching of one (image, category) pair is done for every area range
and threshold at once (numpy over (A, T, G)), looping only over the detections that reach the
lowest threshold, and the accumulation is numpy over (A, T, detections). Every rule is kept:
detections in descending score order (stable), at most maxDets[-1] per pair; a detection takes
the best-IoU available ground truth (the last one on ties), regular ground truth before ignored
(crowd or outside the area range); crowd regions can be matched any number of times;
unmatched detections outside the area range are ignored; precision made monotone from the
right and read at the recall thresholds (left `searchsorted`); -1 where nothing is evaluated.

`tests/test_fast_cocoeval.py` checks the arrays equal COCOeval's on generated and nasty cases.
IoUs are pycocotools' own (`mask.iou`), so the inputs to the comparisons are the same floats.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.cocoeval import COCOeval


@dataclass
class Detections:
    """Every evaluated detection, grouped by (category, image) pair in that order, best score first
    within a pair; a category's detections are one contiguous slice, its images in id order."""

    scores: np.ndarray  # (D,)
    rank: np.ndarray  # (D,) position within its pair
    matched_ids: np.ndarray  # (A, T, D) matched ground-truth id, 0 if none (COCOeval's dtMatches)
    ignored: np.ndarray  # (A, T, D) bool (COCOeval's dtIgnore)
    category_slices: list[slice]  # per category index
    has_pairs: np.ndarray  # (K,) whether the category has ground truth or detections anywhere
    num_regular_gt: np.ndarray  # (K, A) ground truth neither ignored nor outside the area range


def _group_bounds(group_of_item: np.ndarray, num_groups: int) -> np.ndarray:
    """Start offsets (num_groups + 1,) of the groups of items sorted by group."""
    return np.concatenate([[0], np.cumsum(np.bincount(group_of_item, minlength=num_groups))])


class FastCOCOeval(COCOeval):
    """Drop-in COCOeval for iouType segm/bbox with useCats=1; `evalImgs` is left empty.

    Subclasses may override `ignores_unmatched(image_id, category_id)` to ignore a pair's
    unmatched detections (LVIS's not-exhaustively annotated categories).
    """

    def ignores_unmatched(self, image_id: int, category_id: int) -> bool:
        return False

    def evaluate(self) -> None:
        p = self.params
        if p.useSegm is not None:
            p.iouType = "segm" if p.useSegm == 1 else "bbox"
        if p.iouType not in ("segm", "bbox") or not p.useCats:
            raise ValueError(f"FastCOCOeval evaluates iouType segm/bbox with useCats=1, not "
                             f"iouType={p.iouType!r} useCats={p.useCats}: use pycocotools' COCOeval")
        p.imgIds = list(np.unique(p.imgIds))
        p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        self._prepare()
        image_index = {image_id: i for i, image_id in enumerate(p.imgIds)}
        category_index = {category_id: k for k, category_id in enumerate(p.catIds)}
        pairs = sorted((category_index[c], image_index[i], i, c) for i, c in {*self._gts, *self._dts}
                       if i in image_index and c in category_index)
        self.detections = self._match_all(pairs, len(p.catIds))
        self.evalImgs = []
        self._paramsEval = copy.deepcopy(p)

    def _match_all(self, pairs: list[tuple[int, int, int, int]], num_categories: int) -> Detections:
        """COCOeval.evaluateImg for every pair, area range and threshold; per-item attributes are
        gathered into flat arrays once so that the per-pair Python work is the matching alone."""
        p = self.params
        key = "segmentation" if p.iouType == "segm" else "bbox"
        area_ranges = np.asarray(p.areaRng, dtype=np.float64)
        lo, hi = area_ranges[:, :1], area_ranges[:, 1:]
        thresholds = np.minimum(np.asarray(p.iouThrs, dtype=np.float64), 1 - 1e-10)
        num_pairs = len(pairs)

        dts = [d for _, _, i, c in pairs for d in self._dts.get((i, c), [])]
        dt_pair = np.repeat(np.arange(num_pairs), [len(self._dts.get((i, c), [])) for _, _, i, c in pairs])
        scores = np.array([d["score"] for d in dts], dtype=np.float64)
        order = np.lexsort((-scores, dt_pair))  # stable: COCOeval's mergesort within each pair
        bounds = _group_bounds(dt_pair, num_pairs)
        rank = np.arange(len(dts)) - bounds[dt_pair[order]]
        order = order[rank < p.maxDets[-1]]
        dts = [dts[j] for j in order]
        dt_pair, scores, rank = dt_pair[order], scores[order], rank[rank < p.maxDets[-1]]
        dt_bounds = _group_bounds(dt_pair, num_pairs)
        dt_area = np.array([d["area"] for d in dts], dtype=np.float64)

        gts = [g for _, _, i, c in pairs for g in self._gts.get((i, c), [])]
        gt_pair = np.repeat(np.arange(num_pairs), [len(self._gts.get((i, c), [])) for _, _, i, c in pairs])
        gt_bounds = _group_bounds(gt_pair, num_pairs)
        gt_area = np.array([g["area"] for g in gts], dtype=np.float64)
        flagged = np.array([bool(g["ignore"]) for g in gts], dtype=bool)  # crowd (COCO) / ignore (LVIS)
        gt_ignored = flagged[None] | (gt_area < lo) | (gt_area > hi)  # (A, G)
        crowd_list = [int(bool(g["iscrowd"])) for g in gts]
        crowd = np.array(crowd_list, dtype=bool)
        gt_ids = np.array([g["id"] for g in gts], dtype=np.float64)
        dt_regions, gt_regions = [d[key] for d in dts], [g[key] for g in gts]

        matched = np.zeros((len(area_ranges), len(thresholds), len(dts)))
        ignored = np.zeros(matched.shape, dtype=bool)
        lowest = thresholds.min()
        for n in range(num_pairs):
            d0, d1, g0, g1 = dt_bounds[n], dt_bounds[n + 1], gt_bounds[n], gt_bounds[n + 1]
            if d0 == d1 or g0 == g1:
                continue
            ious = np.asarray(mask_util.iou(dt_regions[d0:d1], gt_regions[g0:g1], crowd_list[g0:g1]))
            if ious.max() >= lowest:
                _greedy_match(ious, crowd[g0:g1], gt_ignored[:, g0:g1], gt_ids[g0:g1], thresholds,
                              matched[:, :, d0:d1], ignored[:, :, d0:d1])
        unmatched = matched == 0
        ignored |= unmatched & ((dt_area < lo) | (dt_area > hi))[:, None, :]
        flagged_pairs = np.array([self.ignores_unmatched(i, c) for _, _, i, c in pairs], dtype=bool)
        if flagged_pairs.any():
            ignored |= unmatched & flagged_pairs[dt_pair]
        pair_category = np.array([k for k, _, _, _ in pairs], dtype=np.int64)
        category_bounds = _group_bounds(pair_category, num_categories)
        num_regular = np.zeros((num_categories, len(area_ranges)), dtype=np.int64)
        np.add.at(num_regular, pair_category[gt_pair], (~gt_ignored).T.astype(np.int64))
        slices = [slice(dt_bounds[category_bounds[k]], dt_bounds[category_bounds[k + 1]])
                  for k in range(num_categories)]
        return Detections(scores, rank, matched, ignored, slices, np.diff(category_bounds) > 0,
                          num_regular)

    def accumulate(self, p: object | None = None) -> None:
        if p is not None and p is not self.params:
            raise ValueError("FastCOCOeval.accumulate uses the evaluated params only")
        p = self.params
        rec_thresholds = np.asarray(p.recThrs)
        num_t, num_r, num_k, num_a, num_m = (len(p.iouThrs), len(rec_thresholds), len(p.catIds),
                                             len(p.areaRng), len(p.maxDets))
        precision = -np.ones((num_t, num_r, num_k, num_a, num_m))
        recall = -np.ones((num_t, num_k, num_a, num_m))
        scores = -np.ones((num_t, num_r, num_k, num_a, num_m))
        dets = self.detections
        for k, in_category in enumerate(dets.category_slices):
            if not dets.has_pairs[k]:
                continue
            all_scores, rank = dets.scores[in_category], dets.rank[in_category]
            all_matched = dets.matched_ids[:, :, in_category]
            all_ignored = dets.ignored[:, :, in_category]
            num_regular = dets.num_regular_gt[k]
            for m, max_det in enumerate(p.maxDets):
                keep = rank < max_det
                order = np.argsort(-all_scores[keep], kind="mergesort")
                sorted_scores = all_scores[keep][order]
                matched = all_matched[:, :, keep][:, :, order]
                ignored = all_ignored[:, :, keep][:, :, order]
                tp_sum = np.cumsum((matched != 0) & ~ignored, axis=2).astype(np.float64)
                fp_sum = np.cumsum((matched == 0) & ~ignored, axis=2).astype(np.float64)
                num_dets = len(sorted_scores)
                for a in np.flatnonzero(num_regular):
                    rc = tp_sum[a] / num_regular[a]
                    pr = tp_sum[a] / (fp_sum[a] + tp_sum[a] + np.spacing(1))
                    recall[:, k, a, m] = rc[:, -1] if num_dets else 0
                    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # monotone from the right
                    for t in range(num_t):
                        at = np.searchsorted(rc[t], rec_thresholds, side="left")
                        found = at < num_dets
                        precision[t, found, k, a, m] = pr[t, at[found]]
                        precision[t, ~found, k, a, m] = 0
                        scores[t, found, k, a, m] = sorted_scores[at[found]]
                        scores[t, ~found, k, a, m] = 0
        self.eval = {"params": p, "counts": [num_t, num_r, num_k, num_a, num_m],
                     "precision": precision, "recall": recall, "scores": scores}



def _greedy_match(ious: np.ndarray, crowd: np.ndarray, gt_ignored: np.ndarray, gt_ids: np.ndarray,
                  thresholds: np.ndarray, matched: np.ndarray, ignored: np.ndarray) -> None:
    """COCOeval.evaluateImg's matching of one pair for all (area, threshold) rows at once.

    ious (D, G) with detections best first; gt_ignored (A, G); fills matched/ignored (A, T, D).
    """
    reaches = ious[:, None, :] >= thresholds[None, :, None]  # (D, T, G)
    reachable = ious >= thresholds.min()
    choices = reachable.sum(axis=1)
    if choices.max() <= 1:
        # No detection has two ground truths to choose from, so area ranges and the regular-
        # before-ignored preference cannot matter: at each threshold a ground truth goes to the
        # first detection reaching it (every one reaching it, for a crowd region).
        ds = np.flatnonzero(choices)
        g = reachable[ds].argmax(axis=1)
        hits = reaches[ds, :, g]  # (n, T)
        earlier_same = (g[:, None] == g[None, :]) & np.tri(len(ds), k=-1, dtype=bool)
        taken_before = earlier_same.astype(np.int64) @ hits.astype(np.int64)
        hits &= (taken_before == 0) | crowd[g][:, None]
        matched[:, :, ds] = (hits * gt_ids[g][:, None]).T
        ignored[:, :, ds] = hits.T & gt_ignored[:, None, g]
        return
    num_gts = ious.shape[1]
    free = np.ones((len(gt_ignored), len(thresholds), num_gts), dtype=bool)  # (A, T, G)
    regular = ~gt_ignored[:, None, :]
    for d in np.flatnonzero(choices):
        available = reaches[d] & free  # (A, T, G)
        preferred = available & regular
        candidates = np.where(preferred.any(axis=-1, keepdims=True), preferred, available)
        values = np.where(candidates, ious[d], -1.0)
        best = values.max(axis=-1, keepdims=True)
        last = num_gts - 1 - np.argmax((values == best)[..., ::-1], axis=-1)  # ties: the last (A, T)
        a, t = np.nonzero(candidates.any(axis=-1))
        g = last[a, t]
        free[a, t, g] = crowd[g]  # a taken crowd region stays available
        matched[a, t, d] = gt_ids[g]
        ignored[a, t, d] = gt_ignored[a, g]


