"""Helpers for ``scripts/benchmark.py``: fedjax_exp measured side by side with FedJAX 0.0.17.

Modules:
  timing     warm-up, repeated timings, medians; device synchronisation
  data       the shared FEMNIST files and full-size synthetic data, built for both libraries
  models     the seed chapter's models, built through either library's public API
  reference  FedJAX's side: the seed chapter's jitted training loop
  ours       fedjax_exp's side: its runner's training step and data stream
  sections   one function per benchmark section, each returning table rows
  report     machine/versions, the ratio table (text and Markdown), JSON
"""
