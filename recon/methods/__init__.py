"""Reconstruction methods the engine (recon/engine.py) trains; see recon/method.py."""
