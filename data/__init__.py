"""Data tools: EDM dataset zips (dataset_tool), EDM pickles to snapshot folders (convert_edm), the lab."""
