"""Training: `python -m jmoe.train --config configs/lm_tiny.py --workdir runs/tiny`.

Light to import; the heavy pieces (grain, orbax, tensorboardX) load in the submodules.
"""
