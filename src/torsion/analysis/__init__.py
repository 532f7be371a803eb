"""Analyses of a run: rotation, propagation, random-direction control, category geometry."""
