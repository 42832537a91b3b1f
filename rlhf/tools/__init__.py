"""Tools around the stages: `rlhf plan` (memory and time before renting a GPU), `rlhf plot`, `rlhf generate` and the
simulated KL dynamics the KL controllers are tried on."""
