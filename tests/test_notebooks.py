"""notebooks/*.ipynb run headless (nbclient) against the smoke store, and are committed without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_reproduce import smoke_store  # noqa: F401  (the session's shared store)

from raven.reproduce import report

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    saved = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(book, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return book


def outputs(book: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in book.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def text_of(book: nbformat.NotebookNode) -> str:
    parts = []
    for out in outputs(book):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
        parts.append(out.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


def store_has_strong_protocol(store) -> bool:
    """Whether the smoke reproduction's runs logged the strong protocol (its budget decides)."""
    return "strong" in set(report.curves(report.load_reproduction(store.tracking_uri)).attack)


@pytest.mark.parametrize("name", ["results.ipynb", "latent_space.ipynb"])
def test_notebook_is_committed_without_outputs_and_has_one_parameter_cell(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    code = [cell for cell in book.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0]
    assert "RAVEN_TRACKING_URI" in tagged[0].source and "RAVEN_EXPERIMENT" in tagged[0].source


def test_results_notebook_draws_tables_figure2_and_the_sigma_sweep(smoke_store):  # noqa: F811
    book = execute("results.ipynb", {"RAVEN_TRACKING_URI": smoke_store.tracking_uri,
                                     "RAVEN_EXPERIMENT": "raven-reproduction",
                                     "RAVEN_DATA_DIR": str(smoke_store.data_dir)})
    text = text_of(book)
    assert "REDUCED budget (--smoke)" in text and "20 of 20 runs complete" in text
    assert "| MNIST | RAVEN | 2 |" in text and "92.49 ± 0.51" in text  # Table 2 next to the paper
    assert "0.89 ± 1.29" in text  # Table 1's paper column
    assert "best sigma_aug" in text  # the smoke sweep was found
    if store_has_strong_protocol(smoke_store):
        assert "| MNIST | RAVEN |" in text and " δ=0.1 |" in text  # the paper's attacks beside the strong protocol
    else:
        assert "No strong protocol in this reproduction" in text
    images = [out for out in outputs(book) if "image/png" in out.get("data", {})]
    assert len(images) == 2  # Figure 2 and the sweep plot
    assert not [out for out in outputs(book) if out.output_type == "error"]


def test_results_notebook_says_so_when_the_store_has_no_sweep(smoke_store):  # noqa: F811
    book = execute("results.ipynb", {"RAVEN_TRACKING_URI": smoke_store.tracking_uri,
                                     "RAVEN_SIGMA_EXPERIMENT": "no-such-experiment",
                                     "RAVEN_DATA_DIR": str(smoke_store.data_dir)})
    assert "No sigma_aug sweep in experiment 'no-such-experiment'" in text_of(book)
    assert len([out for out in outputs(book) if "image/png" in out.get("data", {})]) == 1


def test_latent_space_notebook_loads_logged_models_and_draws_tsne(smoke_store):  # noqa: F811
    book = execute("latent_space.ipynb", {"RAVEN_TRACKING_URI": smoke_store.tracking_uri,
                                          "RAVEN_EXPERIMENT": "raven-reproduction", "RAVEN_POINTS": "150",
                                          "RAVEN_DATA_DIR": str(smoke_store.data_dir)})
    text = text_of(book)
    assert "mnist, seed 0: models of vae, vae-noise, raven, raven-gmm, se" in text
    assert "150.0" in text  # the pair-distance summary counts 150 test images per method
    assert ("No strong protocol in these runs" in text) != store_has_strong_protocol(smoke_store)
    images = [out for out in outputs(book) if "image/png" in out.get("data", {})]
    assert len(images) == 3  # the pair-distance histogram, the t-SNE panels, the accuracy curves per method
