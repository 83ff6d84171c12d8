"""Hypothesis settings for the property suite: derandomized (the same examples on every
run and machine), few examples, no example database on disk, no deadline (the CI
machine is slow and shared)."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "napari-sam", derandomize=True, max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("napari-sam")
