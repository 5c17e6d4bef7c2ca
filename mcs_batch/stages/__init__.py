"""Pipeline stages: pure functions on arrays, each wrapped by a thin Ray layer in pipeline.py."""
