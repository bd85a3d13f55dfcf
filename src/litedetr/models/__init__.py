"""Detectors, backbones, criterion and checkpoint conversion."""
