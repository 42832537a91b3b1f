"""The recipe book, installed as `rlhf.recipes` (setup.py maps the package onto this folder): one folder per recipe,
a YAML per stage and a `recipe.yaml` that `rlhf recipes` lists. `configs/accelerate/` holds launch configs."""
