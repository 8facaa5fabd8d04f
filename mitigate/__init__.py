"""diffmem mitigate CLIs (thin wrappers over common/)."""
