"""vldus: zero-shot object detection by synthesizing unseen-class RoI features."""

__version__ = "0.1.0"
