"""Evaluation: ZSD / GZSD mAP and Recall@100 (protocols mmdet-v1 and coco), ``vldus evaluate``."""
from vldus.evaluation.evaluator import PROTOCOLS, SETTINGS, ZSDEvaluator, format_table, harmonic_mean

__all__ = ["ZSDEvaluator", "format_table", "harmonic_mean", "PROTOCOLS", "SETTINGS"]
