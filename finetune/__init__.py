"""diffmem finetune CLIs (thin wrappers over common/)."""
