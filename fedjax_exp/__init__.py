"""fedjax_exp: a FedJAX-compatible federated learning library and experiment framework."""
