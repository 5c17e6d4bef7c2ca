"""mcs-batch: text-driven medical image segmentation over whole archives, on Ray."""
