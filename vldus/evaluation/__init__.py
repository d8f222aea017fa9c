"""Evaluation: ZSD / GZSD mAP and Recall@100 (protocols mmdet-v1 and coco), the error breakdown,
``vldus evaluate``."""
from vldus.evaluation.breakdown import error_breakdown, format_breakdown
from vldus.evaluation.evaluator import PROTOCOLS, SETTINGS, ZSDEvaluator, format_table, harmonic_mean

__all__ = ["ZSDEvaluator", "format_table", "harmonic_mean", "error_breakdown", "format_breakdown",
           "PROTOCOLS", "SETTINGS"]
