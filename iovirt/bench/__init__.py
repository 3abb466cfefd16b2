"""iovirt.bench."""
