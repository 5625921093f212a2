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
class PairResult:
    """Matching of one (image, category) pair for every area range (A) and IoU threshold (T)."""

    image_index: int
    scores: np.ndarray  # (D,) descending
    matched_ids: np.ndarray  # (A, T, D) matched ground-truth id, 0 if none (as COCOeval's dtMatches)
    ignored: np.ndarray  # (A, T, D) bool (COCOeval's dtIgnore)
    num_regular_gt: np.ndarray  # (A,) ground truth neither ignored nor outside the range


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
        self.pair_results: list[list[PairResult]] = [[] for _ in p.catIds]
        area_ranges = np.asarray(p.areaRng, dtype=np.float64)
        thresholds = np.minimum(np.asarray(p.iouThrs, dtype=np.float64), 1 - 1e-10)
        for k, i, image_id, category_id in pairs:
            result = self._match(i, self._gts.get((image_id, category_id), []),
                                 self._dts.get((image_id, category_id), []), area_ranges, thresholds,
                                 p.maxDets[-1])
            if self.ignores_unmatched(image_id, category_id):
                result.ignored |= result.matched_ids == 0
            self.pair_results[k].append(result)
        self.evalImgs = []
        self._paramsEval = copy.deepcopy(p)

    def _match(self, image_index: int, gts: list[dict], dts: list[dict], area_ranges: np.ndarray,
               thresholds: np.ndarray, max_det: int) -> PairResult:
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:max_det]
        dts = [dts[j] for j in order]
        lo, hi = area_ranges[:, :1], area_ranges[:, 1:]
        gt_area = np.array([g["area"] for g in gts], dtype=np.float64)
        flagged = np.array([bool(g["ignore"]) for g in gts], dtype=bool)  # crowd (COCO) / ignore (LVIS)
        gt_ignored = flagged[None] | (gt_area < lo) | (gt_area > hi)  # (A, G)
        dt_area = np.array([d["area"] for d in dts], dtype=np.float64)
        num_areas, num_thresholds, num_dts, num_gts = len(area_ranges), len(thresholds), len(dts), len(gts)
        matched = np.zeros((num_areas, num_thresholds, num_dts))
        ignored = np.zeros((num_areas, num_thresholds, num_dts), dtype=bool)
        if num_dts and num_gts:
            crowd = np.array([bool(g["iscrowd"]) for g in gts], dtype=bool)
            key = "segmentation" if self.params.iouType == "segm" else "bbox"
            ious = mask_util.iou([d[key] for d in dts], [g[key] for g in gts], crowd.astype(int).tolist())
            gt_ids = np.array([g["id"] for g in gts], dtype=np.float64)
            self._greedy_match(np.asarray(ious), crowd, gt_ignored, gt_ids, thresholds, matched, ignored)
        outside = (dt_area < lo) | (dt_area > hi)  # (A, D)
        ignored |= (matched == 0) & outside[:, None, :]
        return PairResult(image_index, np.array([d["score"] for d in dts], dtype=np.float64), matched,
                          ignored, (~gt_ignored).sum(axis=1))

    @staticmethod
    def _greedy_match(ious: np.ndarray, crowd: np.ndarray, gt_ignored: np.ndarray, gt_ids: np.ndarray,
                      thresholds: np.ndarray, matched: np.ndarray, ignored: np.ndarray) -> None:
        """COCOeval.evaluateImg's matching for all (area, threshold) rows at once; fills the outputs."""
        num_gts = ious.shape[1]
        free = np.ones((len(gt_ignored), len(thresholds), num_gts), dtype=bool)  # (A, T, G)
        reaches = ious[:, None, :] >= thresholds[None, :, None]  # (D, T, G)
        regular = ~gt_ignored[:, None, :]
        reachable = ious >= thresholds.min()
        for d in np.flatnonzero(reachable.any(axis=1)):
            candidates = np.flatnonzero(reachable[d])
            if len(candidates) == 1:  # the common case, without ties to break
                g = candidates[0]
                hit = free[:, :, g] & reaches[d, :, g]  # (A, T)
                matched[:, :, d] = hit * gt_ids[g]
                ignored[:, :, d] = hit & gt_ignored[:, g, None]
                if not crowd[g]:  # a taken crowd region stays available
                    free[:, :, g] &= ~hit
                continue
            available = reaches[d] & free  # (A, T, G)
            preferred = available & regular
            candidates = np.where(preferred.any(axis=-1, keepdims=True), preferred, available)
            values = np.where(candidates, ious[d], -1.0)
            best = values.max(axis=-1, keepdims=True)
            last = num_gts - 1 - np.argmax((values == best)[..., ::-1], axis=-1)  # (A, T)
            a, t = np.nonzero(candidates.any(axis=-1))
            g = last[a, t]
            free[a, t, g] = crowd[g]
            matched[a, t, d] = gt_ids[g]
            ignored[a, t, d] = gt_ignored[a, g]

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
        for k, results in enumerate(self.pair_results):
            if not results:
                continue
            all_scores = np.concatenate([r.scores for r in results])
            rank = np.concatenate([np.arange(len(r.scores)) for r in results])
            all_matched = np.concatenate([r.matched_ids for r in results], axis=2)
            all_ignored = np.concatenate([r.ignored for r in results], axis=2)
            num_regular = np.sum([r.num_regular_gt for r in results], axis=0)
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
