"""Hummingbird dense nearest-neighbour retrieval (METHOD.md §6.3): memory bank, search and label transfer."""
