"""Reading inputs: image files and CSV tables."""
