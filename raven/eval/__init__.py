"""The evaluation layer: the linear probe, the attacks and protocols, metrics, FID, results and plots.

Imports only the method core (raven/*.py) and itself."""
