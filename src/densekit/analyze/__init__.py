"""Analyses that test the DenseBlock blog post's claims about dense connectivity on real
models.

One module per analysis, each a library function that returns plain dicts (and a PNG
helper): ``reuse`` (feature reuse, the paper's Fig. 5), ``gradients`` (gradient flow at
initialization, DenseNet against the same layers chained), ``cost`` (parameters, MACs and
training activations against ResNets), ``overfit`` (the train/validation gap of a run).
``report.analyze`` runs them on a run directory or a model name and writes the files.
docs/claims.md holds the figures they produced.
"""

from .cost import activation_memory, cost_table, saved_activation_bytes
from .gradients import ChainBlock, chain_of, gradient_flow
from .overfit import check_records, overfitting
from .report import ANALYSES, AnalyzeReport, analyze
from .reuse import feature_reuse

__all__ = ["ANALYSES", "ChainBlock", "activation_memory", "analyze", "chain_of", "cost_table", "feature_reuse",
           "gradient_flow", "overfitting", "check_records", "saved_activation_bytes", "AnalyzeReport"]
