"""avatar-studio: phone video -> 3D Gaussian talking-head avatar driven by speech.

Pipeline (each arrow is an on-disk artifact with a versioned format):
    video --capture/--> dataset folder --recon/--> trained avatar --> renders, viewer/
"""

__version__ = "0.1.0"
