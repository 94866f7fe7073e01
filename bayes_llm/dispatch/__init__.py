"""First-pass task identification and the Bayesian controller that turns it into an expert blend."""
