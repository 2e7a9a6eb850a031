"""Adversarial training: objectives, AWP, train state, optimizer, the pure steps, the loop."""
