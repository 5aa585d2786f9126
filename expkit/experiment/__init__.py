"""The Experiment: a folder of samples, one AnnData per sample and modality, and an integrated MuData."""
