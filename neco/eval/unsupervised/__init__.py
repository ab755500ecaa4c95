"""Unsupervised semantic segmentation (METHOD.md §6.5): foreground extraction, clustering and community merging."""
