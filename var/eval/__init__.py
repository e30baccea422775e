"""Evaluation: FID Inception-v3, FID / sFID / IS / precision-recall, the bundled `python -m var.eval.fid` script."""

from var.eval.inception import InceptionV3FID, load_inception, load_inception_state_dict, state_dict_to_model
from var.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from var.eval.preprocess import preprocess, validate_images
from var.eval.reference import load_reference, open_images, save_reference

__all__ = [
  "InceptionV3FID",
  "feature_statistics",
  "frechet_distance",
  "inception_score",
  "load_inception",
  "load_inception_state_dict",
  "load_reference",
  "open_images",
  "precision_recall",
  "preprocess",
  "save_reference",
  "state_dict_to_model",
  "validate_images",
]
