"""metahpo's Hydra configs (a package, so that ``pkg://metahpo.configs`` finds them)."""
