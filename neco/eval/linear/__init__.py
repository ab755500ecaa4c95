"""Linear segmentation (METHOD.md §6.4): a 1x1 convolution trained on frozen patch tokens."""
