"""diffmem detect CLIs (thin wrappers over common/)."""
