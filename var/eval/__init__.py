"""Evaluation: FID Inception-v3, FID / sFID / IS / precision-recall."""
