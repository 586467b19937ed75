"""The reproduction layer: the grid of (dataset, method, seed) cells, its Ray and offline
runners, and the report of the paper's tables and figures.

Imports every layer above it."""
