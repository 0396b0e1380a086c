"""gnr: gradient-norm regularisation for robust image classifiers."""
__version__ = "0.1.0"
