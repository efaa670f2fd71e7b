"""A user's own Hydra app over metahpo's configs (pkg://metahpo.configs)."""

import json

import hydra
from hydra.core.hydra_config import HydraConfig

import metahpo


@hydra.main(version_base=None, config_path="myconfigs", config_name="train")
def main(cfg):
    out = metahpo.run(cfg, HydraConfig.get().runtime.output_dir)
    print(json.dumps({"task": out["task"], "estimator": out["estimator"]}))


if __name__ == "__main__":
    main()
