"""Data: image loading and preprocessing (``image``); the shapes world and the Grain
pipeline come with the data issue."""
