"""edgecompress: teacher + data + target -> a verified, compact artifact for an edge device."""
__version__ = "0.1.0"
