"""Training: DHN-NCE fine-tuning of BiomedCLIP and weakly supervised nnU-Net."""
