"""Benchmarks (`vreason-batch bench`) and the reasoning data set they generate."""
