"""Evaluation of trained checkpoints: protocols, attacks over the points, audit, analysis."""
