"""The building blocks every evaluation shares: patch features, label resizing, standardisation and PCA,
k-means, attention foreground, nearest-neighbour search, crops and segmentation metrics. Each reference quirk is
a named parameter here, so a protocol states which behaviour it uses."""
