"""The sweep layer: the spec and its flags, the Optuna study, Ray Tune, selection, the clock,
the driver and its queued record, the sweep report, the cluster.

Imports the layers above it (core, eval, record) and itself."""
