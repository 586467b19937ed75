"""The record layer: the MLflow record (the one writer), its durable write queue, provenance.

Imports the method core, the evaluation layer and itself."""
