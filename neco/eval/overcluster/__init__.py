"""Overclustering (METHOD.md §6.2): k-means on frozen patch features, clusters matched to classes."""
