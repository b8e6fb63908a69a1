"""The Python API: what ``automl-ad`` does, as functions and objects a notebook calls.

The command line is built on it (``automl_ad/cli`` parses options, calls these, prints)::

    import automl_ad as ad

    ad.plan("screw", "2h").text()                      # the schedule, no training
    result = ad.search("screw", "10m", seed=0)         # -> SearchResult
    result.leaderboard()                               # pandas DataFrame, best first
    result.spearman                                    # does val rank trials as test does?
    detector = result.export()                         # ensemble -> models/screw -> Detector
    result.report()                                    # HTML page
    ad.load("models/screw").predict(["a.png", pil_image, array]).scores

docs/api.md describes every name; docs/examples/quickstart.ipynb runs them.
"""

from __future__ import annotations

from automl_ad.api.detector import Detector, ImageLike, Predictions, load
from automl_ad.api.result import SearchResult, SpearmanVerdict, open_search
from automl_ad.api.runs import all_products, plan, read_jobs, search, search_many

__all__ = ["Detector", "ImageLike", "Predictions", "SearchResult", "SpearmanVerdict", "all_products", "load",
           "open_search", "plan", "read_jobs", "search", "search_many"]
