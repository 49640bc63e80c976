"""The evaluation wing: the Pegasus sampler, quality classifier, held-out metrics, report."""
