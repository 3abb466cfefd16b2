"""iovirt.vtd."""
