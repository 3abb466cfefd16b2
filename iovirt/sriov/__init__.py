"""iovirt.sriov."""
