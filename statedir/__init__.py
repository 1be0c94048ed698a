"""The state directory (default ``./.gateway/``): where every file of a node lives, and how files there are written."""
