"""Minimal-pair benchmarks (sWUGGY, sBLIMP, spoken and topic StoryCloze) read from their public layouts."""
