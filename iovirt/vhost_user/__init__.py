"""iovirt.vhost_user."""
