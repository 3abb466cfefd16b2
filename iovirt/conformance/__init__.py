"""iovirt.conformance."""
