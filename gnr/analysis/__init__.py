"""Analyses of trained runs (PAPER.md §4), each logged back into the runs it looks at.

- :mod:`gnr.analysis.curve`: per-image minimal ε and robust accuracy vs ε (Fig. 2).
- :mod:`gnr.analysis.gradients`: input-gradient statistics (Table 1).
- :mod:`gnr.analysis.figures`: gradients and PGD perturbations beside the images (Figs. 1 and 3).
- :mod:`gnr.analysis.report`: Tables 2 and 3 from what `gnr train` and `gnr eval` logged.
- :mod:`gnr.analysis.runs`: what they share: loading runs' models and images, logging outputs.
"""
