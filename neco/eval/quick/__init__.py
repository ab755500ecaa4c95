"""The reduced check the quickstart and `eval=quick` run: k-means and nearest-neighbour mIoU on a few images
(METHOD.md §6.1)."""
