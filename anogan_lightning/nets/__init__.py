"""Plain ``nn.Module`` networks: no Lightning, no Hydra, no losses."""
