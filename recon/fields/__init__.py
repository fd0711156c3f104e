"""Neural-field building blocks of the radiance-field method: the multi-resolution hash
encoding (``hash_encoding``) with its torch reference and compiled kernels."""

from .hash_encoding import HashEncoding, HashGridConfig, hash_encode, hash_encode_reference, level_grid

__all__ = ["HashEncoding", "HashGridConfig", "hash_encode", "hash_encode_reference", "level_grid"]
