"""Scoring: paired statistics and the per-task records a comparison rests on."""
