"""The method's models: BiomedCLIP, M2IB saliency and SAM, with weights loaded from URIs."""
