"""Inspection statistics: weight and activation distributions, outliers, Gram matrices, cache."""
