"""The miniature reproduction: synthetic preference data, tiny random-weight models, the embedded demo
(``zreward demo``) and the ablation table (``zreward ablate``)."""
