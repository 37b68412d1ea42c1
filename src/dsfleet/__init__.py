"""dsfleet: one run spec and one training entry point for DeepSpeed, from a laptop to many GPU nodes."""
__version__ = "0.1.0"
