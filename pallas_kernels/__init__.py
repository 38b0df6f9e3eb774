"""Pallas kernels for jmoe: grouped expert GEMMs and capacity-constrained dispatch."""
