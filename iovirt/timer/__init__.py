"""iovirt.timer."""
