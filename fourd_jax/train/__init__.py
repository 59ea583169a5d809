"""Training: the shared loop, DIFT and 4DRL steps."""
