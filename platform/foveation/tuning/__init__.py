"""Ray Tune sweeps over patch-set configurations: the space (``space``), the sweep driver and
its trials (``sweep``), and what is made of the results (``results``)."""
