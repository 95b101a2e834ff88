"""Experiments that drive training and evaluation together: the paper's experiment (every
baseline and the learned mix on one budget, then one evaluation) and its science criteria."""
