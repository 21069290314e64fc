"""The method's parts: grid sampling and quantisation, the modularity and contrastive losses,
the concept bank, the MLP/TR heads with their EMA twins, the cluster probe, the dense CRF and
the Hungarian-matched metrics. Import from the submodules (`modules.losses`, `modules.heads`, ...)."""
