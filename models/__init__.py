"""Offline half of SlateCTR: data contracts, simulator, models, training and evaluation.

Importing this package imports nothing heavy: `models.features` is torch-free so that the
serving path can share the vocabulary code; every torch module is imported explicitly.
"""
