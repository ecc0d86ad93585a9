"""The core: the NMF estimator and NMFConceptAttribution, their names and persistence."""
