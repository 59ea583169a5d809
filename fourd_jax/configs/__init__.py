"""Run configs shipped with the package, each a Python `get_config(arg)` returning a ConfigDict.

`fourd-jax dift --config dift:PRESET[,MESH]` (or `rl:`, `demo`, `study:`) names one of these from
any directory; a path to a config file of your own works too (`--config my_config.py:ARG`).
"""
